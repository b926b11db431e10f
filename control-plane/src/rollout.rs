//! Rollouts: the safe way to change a map that moves bases.
//!
//! ```text
//! plan ─▶ fence ─▶ restart ─▶ activate ─▶ done
//!   │        │         │
//!   └────────┴─────────┴──▶ rolling_back ─▶ rolled_back
//! ```
//!
//! - **plan**: `shardmap::diff` gives the fence (exactly the moved bases); the servers
//!   to restart are those whose `may_hold` history meets the fence (see
//!   [`restart_plan`]). The Envoy instances that must ACK are recorded (see
//!   [`Waits`]): without guards, every instance known now, even disconnected (it
//!   may still serve with the old map; forget one taken out of service with
//!   `DELETE /v1/nodes/{id}`); when every server that loses or gains a moved base is
//!   `guarded`, only the guards of those servers (a stale or cut-off edge can only
//!   reach a guard that refuses). A node id held by two Envoys ([`Conflict`]) among
//!   those waited for refuses the rollout: one ACK could stand for an Envoy that
//!   never saw the fence.
//! - **fence**: the old map is published again with `fence = plan.fence` (a
//!   [`VersionKind::Fence`] version); every recorded or connected Envoy waited for
//!   must ACK it within `ack_timeout` (a NACK, a timeout or a node id conflict
//!   appearing rolls back).
//! - **restart**: the Envoys are checked again (one may have reconnected); then the
//!   rollout waits `drain` (a request routed just before the fence and still waiting
//!   for a connection must reach the old process, not the restarted one: found by
//!   the model in `crates/rollout-model`); then each server to restart runs its hook (command, HTTP call, or manual confirmation)
//!   and must answer `pong` on its health URL within `health_timeout`.
//! - **activate**: the new map is published without fence; from here on the rollout
//!   only goes forward (an Envoy may already serve the new map). Missing ACKs become
//!   warnings: an Envoy still on the fence answers 503 for the moved bases, never
//!   routes them to their old server.
//! - **done**: every server's `may_hold` is updated, with the audit entry, in one
//!   transaction.
//!
//! A failure before activation, or `abort`, goes to **rolling_back**: the old map is
//! published without fence (a [`VersionKind::Rollback`] version).
//!
//! Each state change is written to the store (a transaction, committed) before the
//! step acts, and every action is idempotent on resume: a control plane killed at any
//! point and started again ([`resume`]) continues from the stored step: it adopts a
//! version it had published before dying, re-waits the ACKs, re-runs the hook of every
//! server not recorded healthy.
//!
//! **Several replicas** (etcd): only the leader drives a rollout, and a rollout is
//! bound to the leader term it was started or resumed under: every step is written
//! under that term's fencing token, so a deposed leader (paused, cut off) can never
//! write a step after another replica took over; it stops at its next write, and
//! the new leader resumes from the stored step. A command hook records its host and
//! pid: a new leader on the same host waits for a hook the old one left running
//! instead of starting a second restart of that server at once. Hooks must be
//! idempotent all the same (a hook on another host cannot be seen).
//!
//! `may_hold`, per server: the map versions whose bases it may have loaded since
//! seashard last restarted it; unknown (never restarted by seashard) means anything.
//! A server restarted during a rollout's fence can load only the unfenced bases it
//! owns under the old map, which it also owns under the new one (they did not move):
//! so after `done` its history is just the new version, after `rolled_back` just the
//! old one. A server not restarted adds the new version to its history.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shardmap::{Fence, ShardMap, diff, owners_within};
use tokio::sync::OwnedMutexGuard;

use crate::config::RestartHook;
use crate::nodes::{Conflict, Node};
use crate::plane::{ControlPlane, Proposal, ProposeError};
use crate::resources::ResourceType;
use crate::store::{FinishRollout, NewAudit, NewVersion, StoreError, VersionKind, now_ms};
use daemon::health;

/// How often a restarted server's health URL is polled.
const HEALTH_POLL: Duration = Duration::from_millis(100);
/// How long one health check may take.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// The driver's first wait after the store failed; it doubles with each failure
/// in a row, up to [`STORE_RETRY_MAX`].
const STORE_RETRY_FIRST: Duration = Duration::from_millis(100);
/// The driver's longest wait between tries while the store fails: once the store
/// is back, the rollout goes on (or rolls back on `abort`) within this.
const STORE_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long `abort` waits for the change lock to start a driver for a rollout
/// that has none (a change that needs no rollout holds it for a moment).
const ABORT_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Plan,
    Fence,
    Restart,
    Activate,
    Done,
    RollingBack,
    RolledBack,
}

impl Step {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Plan => "plan",
            Step::Fence => "fence",
            Step::Restart => "restart",
            Step::Activate => "activate",
            Step::Done => "done",
            Step::RollingBack => "rolling_back",
            Step::RolledBack => "rolled_back",
        }
    }

    /// `done` or `rolled_back`.
    pub fn finished(self) -> bool {
        matches!(self, Step::Done | Step::RolledBack)
    }

    /// Before activation: a failure or an abort still rolls back.
    pub fn may_roll_back(self) -> bool {
        matches!(self, Step::Plan | Step::Fence | Step::Restart)
    }
}

/// Where one server's restart is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartState {
    /// Not started.
    Pending,
    /// Its hook runs (or, manual, the operator is asked to restart it).
    Restarting,
    /// The hook succeeded; waiting for `pong`.
    Restarted,
    /// It answered `pong`.
    Healthy,
    /// Its hook or health check failed.
    Failed,
}

impl RestartState {
    /// Its hook runs, or it is waited on to answer `pong`.
    fn under_way(self) -> bool {
        matches!(self, RestartState::Restarting | RestartState::Restarted)
    }
}

/// A server the rollout restarts, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerRestart {
    pub server: String,
    pub why: String,
    /// `command`, `http` or `manual`.
    pub hook: String,
    pub state: RestartState,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub started_at: Option<i64>,
    #[serde(default)]
    pub restarted_at: Option<i64>,
    #[serde(default)]
    pub healthy_at: Option<i64>,
    #[serde(default)]
    pub error: Option<String>,
    /// The running command hook: a leader taking over on the same host waits for
    /// it rather than restart the server a second time at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_process: Option<HookProcess>,
}

/// A command hook's process, as a leader on another term can find it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookProcess {
    pub host: String,
    pub pid: u32,
    /// Its start time (clock ticks since boot, `/proc/PID/stat`): a pid reused by
    /// another process does not match; a hook that `exec`s another program does.
    pub started: u64,
}

/// A server the rollout leaves running, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub server: String,
    pub why: String,
}

/// One step as it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub started_at: i64,
    #[serde(default)]
    pub finished_at: Option<i64>,
    #[serde(default)]
    pub note: Option<String>,
}

/// A rollout as stored (one JSON record, rewritten at every step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: u64,
    pub state: Step,
    /// The active version when it began (the old map).
    pub from_version: u64,
    pub old_map: ShardMap,
    pub new_map: ShardMap,
    /// Exactly the moved bases.
    pub fence: Fence,
    /// `shardmap::diff(old, new)` as JSON (moved slot ranges and pins, moves).
    pub plan: Value,
    pub restart: Vec<ServerRestart>,
    pub skipped: Vec<Skipped>,
    /// The Envoy instances known when it began (connected or not) that must ACK the
    /// fence: every one, or (guarded) the guards of `guarded`.
    pub envoys: Vec<String>,
    /// Non-empty when every server losing or gaining a moved base is guarded: the
    /// rollout waits for these servers' guards only (edges are reported, not waited for).
    #[serde(default)]
    pub guarded: Vec<String>,
    #[serde(default)]
    pub fence_version: Option<u64>,
    #[serde(default)]
    pub new_version: Option<u64>,
    #[serde(default)]
    pub rollback_version: Option<u64>,
    pub author: String,
    pub comment: String,
    /// Why it rolled back.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
    pub steps: Vec<StepRecord>,
    pub created_at: i64,
    #[serde(default)]
    pub finished_at: Option<i64>,
    /// Time spent in the restart step, ms.
    #[serde(default)]
    pub restart_ms: Option<u64>,
    /// Everything but the restarts (plan, fence ACKs, activation ACKs), ms.
    #[serde(default)]
    pub overhead_ms: Option<u64>,
    /// How many times a control plane resumed it.
    #[serde(default)]
    pub resumed: u32,
    /// At most this many servers restart at once (else `[rollout]
    /// max_parallel_restarts`).
    #[serde(default)]
    pub parallel: Option<usize>,
}

impl Rollout {
    /// Closes the current step and opens `next`.
    fn enter(&mut self, next: Step, note: Option<String>) {
        let now = now_ms();
        if let Some(last) = self.steps.last_mut()
            && last.finished_at.is_none()
        {
            last.finished_at = Some(now);
        }
        self.state = next;
        self.steps.push(StepRecord {
            step: next,
            started_at: now,
            finished_at: None,
            note,
        });
    }

    fn roll_back(&mut self, reason: String) {
        tracing::warn!(rollout = self.id, %reason, "rolling back");
        self.reason = Some(reason.clone());
        self.enter(Step::RollingBack, Some(reason));
    }

    /// Whose ACKs it waits for.
    pub fn waits(&self) -> Waits {
        Waits {
            envoys: self.envoys.clone(),
            guarded: self.guarded.clone(),
        }
    }

    /// The server whose restart is under way.
    pub fn restarting(&self) -> Option<&ServerRestart> {
        self.restarting_all().next()
    }

    /// Every server whose restart is under way (several with parallel restarts).
    pub fn restarting_all(&self) -> impl Iterator<Item = &ServerRestart> {
        self.restart.iter().filter(|s| s.state.under_way())
    }

    /// Marks every restart under way failed: its task was stopped, for `why`.
    fn stop_restarts(&mut self, why: &str) {
        for s in &mut self.restart {
            if s.state.under_way() {
                s.state = RestartState::Failed;
                s.error = Some(format!("stopped: {why}"));
            }
        }
    }

    fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl RolloutError {
    /// This replica is not (or no longer) the leader: the rollout is another's.
    pub fn not_leader(&self) -> bool {
        matches!(
            self,
            RolloutError::Store(StoreError::NotLeader(_))
                | RolloutError::Propose(ProposeError::Store(StoreError::NotLeader(_)))
        )
    }
}

/// Why a rollout could not be started or steered.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Propose(#[from] ProposeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No rollout runs.
    #[error("no rollout is running")]
    NoneRunning,
    /// Activation began: the rollout can only complete.
    #[error("rollout {0} is activating the new map: it can no longer be aborted")]
    TooLate(u64),
    /// `confirm` of a server the rollout does not wait for.
    #[error("rollout {id} is not waiting for a manual restart of `{server}`")]
    NotWaiting { id: u64, server: String },
    #[error("stored rollout: {0}")]
    Corrupt(String),
    /// A node id the rollout would wait for is held by more than one Envoy.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Conflicts(Vec<Conflict>),
    /// A rollout has not finished: no other may begin (its `may_hold` updates are
    /// not made yet, so restarts would be planned from a stale history).
    #[error(
        "rollout {0} has not finished: wait for it to end, or roll it back with \
         `seactl rollout abort`"
    )]
    Unfinished(u64),
    /// A guarded server has no guard to wait for.
    #[error(
        "server `{server}` is guarded, but no guard of it has connected to this control \
         plane: start its guard (`seactl envoy-bootstrap --kind guard --server {server}`) \
         or set `guarded = false`"
    )]
    NoGuard { server: String },
}

/// Whose ACKs a rollout waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waits {
    /// Instance keys that must ACK, connected or not.
    pub envoys: Vec<String>,
    /// When non-empty: only guards of these servers are waited for.
    pub guarded: Vec<String>,
}

impl Waits {
    /// Whose ACKs a rollout of `plan` waits for, given the instances known now; or
    /// why it cannot start.
    pub fn of(
        plane: &ControlPlane,
        plan: &shardmap::Plan,
        nodes: &[Node],
        conflicts: Vec<Conflict>,
    ) -> Result<Waits, RolloutError> {
        let involved: BTreeSet<&str> = plan
            .losing
            .iter()
            .chain(&plan.gaining)
            .map(String::as_str)
            .collect();
        let all_guarded = !involved.is_empty()
            && involved
                .iter()
                .all(|s| plane.config().server(s).is_some_and(|c| c.guarded));
        let guarded: Vec<String> = if all_guarded {
            involved.iter().map(|s| (*s).to_owned()).collect()
        } else {
            Vec::new()
        };
        let w = Waits {
            envoys: Vec::new(),
            guarded,
        };
        for s in &w.guarded {
            if !nodes.iter().any(|n| n.role.guarded() == Some(s.as_str())) {
                return Err(RolloutError::NoGuard { server: s.clone() });
            }
        }
        let counted: Vec<&Node> = nodes.iter().filter(|n| w.counts(n)).collect();
        let envoys: Vec<String> = counted.iter().map(|n| n.instance.clone()).collect();
        let ids: BTreeSet<&str> = counted.iter().map(|n| n.id.as_str()).collect();
        let conflicts: Vec<Conflict> = conflicts
            .into_iter()
            .filter(|c| ids.contains(c.id.as_str()))
            .collect();
        if !conflicts.is_empty() {
            return Err(RolloutError::Conflicts(conflicts));
        }
        Ok(Waits { envoys, ..w })
    }

    /// Whether the rollout waits for `node` (when connected, or when recorded).
    pub fn counts(&self, node: &Node) -> bool {
        self.guarded.is_empty()
            || node
                .role
                .guarded()
                .is_some_and(|s| self.guarded.iter().any(|g| g == s))
    }
}

/// The servers a rollout with this fence must restart, and those it leaves, each
/// with the reason: a server is restarted when seashard never restarted it, or when
/// it owned a base of the fence under a map version it may still hold.
pub fn restart_plan(
    plane: &ControlPlane,
    fence: &Fence,
) -> Result<(Vec<ServerRestart>, Vec<Skipped>), ProposeError> {
    let mut owners: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut restart = Vec::new();
    let mut skipped = Vec::new();
    for s in &plane.config().servers {
        let hook = match s.restart {
            RestartHook::Command { .. } => "command",
            RestartHook::Http { .. } => "http",
            RestartHook::Manual => "manual",
        };
        let why = match plane.store().may_hold(&s.name)? {
            None => {
                Some("seashard never restarted it: it may hold any base (first rollout)".to_owned())
            }
            Some(versions) => {
                let mut found = None;
                for v in &versions {
                    if !owners.contains_key(v) {
                        let Some(version) = plane.store().version(*v)? else {
                            found = Some(format!(
                                "its history names version {v}, which the store lacks"
                            ));
                            break;
                        };
                        let o =
                            owners_within(&version.map, fence).map_err(ProposeError::Invalid)?;
                        owners.insert(*v, o);
                    }
                    if owners.get(v).is_some_and(|o| o.contains(&s.name)) {
                        found = Some(format!(
                            "it owned moved bases under map version {v}, active since its last restart"
                        ));
                        break;
                    }
                }
                if found.is_none() {
                    skipped.push(Skipped {
                        server: s.name.clone(),
                        why: format!(
                            "since its last restart it owned none of the moved bases (map versions {})",
                            versions
                                .iter()
                                .map(u64::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
                found
            }
        };
        if let Some(why) = why {
            restart.push(ServerRestart {
                hook_process: None,
                server: s.name.clone(),
                why,
                hook: hook.to_owned(),
                state: RestartState::Pending,
                attempts: 0,
                started_at: None,
                restarted_at: None,
                healthy_at: None,
                error: None,
            });
        }
    }
    Ok((restart, skipped))
}

/// Starts a rollout of `p.map` (which must move bases): plans it, records it, and
/// runs it in the background. Returns the rollout as first stored.
pub fn begin(plane: &Arc<ControlPlane>, p: &Proposal) -> Result<Rollout, RolloutError> {
    begin_with(plane, p, None)
}

/// As [`begin`], restarting at most `parallel` servers at once (else `[rollout]
/// max_parallel_restarts`).
pub fn begin_with(
    plane: &Arc<ControlPlane>,
    p: &Proposal,
    parallel: Option<usize>,
) -> Result<Rollout, RolloutError> {
    plane.check_map(&p.map).map_err(ProposeError::Invalid)?;
    let guard = plane.try_begin_change()?;
    // One rollout at a time, driven or not: an unfinished one still has to update
    // `may_hold`, which this one's restart plan reads.
    if let Some(stored) = plane.store().unfinished_rollout()? {
        return Err(RolloutError::Unfinished(stored.id));
    }
    // Before the rollout is stored: an abort asked for from then on is kept.
    plane.rollout_signals().reset();
    let active = plane.active()?;
    p.check_base(active.version)?;
    if !active.fence.is_empty() {
        return Err(ProposeError::Busy.into());
    }
    let plan = diff(&active.map, &p.map).map_err(ProposeError::Invalid)?;
    let (restart, skipped) = restart_plan(plane, &plan.fence)?;
    // Every known Envoy waited for, connected or not: one that is disconnected may
    // still serve requests with the old map. One taken out of service is forgotten
    // first (`DELETE /v1/nodes/{id}`).
    let waits = Waits::of(
        plane,
        &plan,
        &plane.registry().nodes(),
        plane.registry().conflicts(),
    )?;
    let now = now_ms();
    let mut r = Rollout {
        id: 0,
        state: Step::Plan,
        from_version: active.version,
        old_map: active.map.clone(),
        new_map: p.map.clone(),
        fence: plan.fence.clone(),
        plan: serde_json::to_value(&plan).unwrap_or(Value::Null),
        restart,
        skipped,
        envoys: waits.envoys,
        guarded: waits.guarded,
        fence_version: None,
        new_version: None,
        rollback_version: None,
        author: p.author.clone(),
        comment: p.comment.clone(),
        reason: None,
        warnings: Vec::new(),
        steps: vec![StepRecord {
            step: Step::Plan,
            started_at: now,
            finished_at: None,
            note: None,
        }],
        created_at: now,
        finished_at: None,
        restart_ms: None,
        overhead_ms: None,
        resumed: 0,
        parallel,
    };
    r.id = plane
        .store()
        .insert_rollout(Step::Plan.as_str(), &r.to_value())?;
    plane.store().audit(&NewAudit {
        actor: &p.author,
        action: "rollout.begin",
        version: Some(active.version),
        detail: json!({ "rollout": r.id, "comment": p.comment,
                        "restart": r.restart.iter().map(|s| &s.server).collect::<Vec<_>>() }),
    })?;
    tracing::info!(
        rollout = r.id,
        from = active.version,
        restart = ?r.restart.iter().map(|s| &s.server).collect::<Vec<_>>(),
        "rollout planned"
    );
    start_driver(plane, guard, r.clone());
    Ok(r)
}

/// Runs `r` in the background under the change lock `guard`.
fn start_driver(plane: &Arc<ControlPlane>, guard: OwnedMutexGuard<()>, r: Rollout) {
    // Set before the task runs: `abort` must not start a second driver meanwhile.
    plane.rollout_signals().set_driving(true);
    tokio::spawn(drive(plane.clone(), guard, r));
}

/// Resumes the stored unfinished rollout, if any, from its stored step. First the
/// stored active version is served (a new leader's snapshot may lag the store); the
/// driver then waits for ACKs of the rollout's own recorded versions.
///
/// Any error leaves the rollout without a driver: the caller tries again
/// (`Busy`: an earlier term's driver still holds the change lock).
pub fn resume(plane: &Arc<ControlPlane>) -> Result<Option<u64>, RolloutError> {
    let Some(stored) = plane.store().unfinished_rollout()? else {
        return Ok(None);
    };
    let mut r: Rollout = serde_json::from_value(stored.record)
        .map_err(|e| RolloutError::Corrupt(format!("rollout {}: {e}", stored.id)))?;
    let guard = plane.try_begin_change()?;
    let active = plane.active()?;
    plane.adopt(active.version)?;
    let signals = plane.rollout_signals();
    signals.reset();
    if let Some(reason) = stored.abort_requested {
        signals.request_abort(&reason);
    }
    r.resumed += 1;
    if let Some(last) = r.steps.last_mut() {
        let note = format!("resumed by a restarted control plane ({})", r.resumed);
        last.note = Some(match last.note.take() {
            Some(n) => format!("{n}; {note}"),
            None => note,
        });
    }
    plane
        .store()
        .save_rollout(r.id, r.state.as_str(), &r.to_value())?;
    tracing::warn!(
        rollout = r.id,
        step = r.state.as_str(),
        "resuming the stored rollout"
    );
    let id = r.id;
    start_driver(plane, guard, r);
    Ok(Some(id))
}

/// Asks the unfinished rollout to roll back (refused once activation began), and
/// makes sure it has a driver: on the leader, a rollout left without one (its
/// driver stopped, a resume failed) gets one here, which rolls it back, or
/// completes it when activation began. Blocking: call it off the async workers.
pub fn abort(plane: &Arc<ControlPlane>, reason: &str) -> Result<u64, RolloutError> {
    let stored = plane
        .store()
        .unfinished_rollout()?
        .ok_or(RolloutError::NoneRunning)?;
    let state: Rollout = serde_json::from_value(stored.record)
        .map_err(|e| RolloutError::Corrupt(format!("rollout {}: {e}", stored.id)))?;
    if state.state.may_roll_back() {
        plane.store().request_abort(stored.id, reason)?;
        plane.rollout_signals().request_abort(reason);
    }
    ensure_driver(plane)?;
    if !state.state.may_roll_back() && state.state != Step::RollingBack {
        return Err(RolloutError::TooLate(stored.id));
    }
    Ok(stored.id)
}

/// Starts a driver for the stored unfinished rollout unless one runs here (or this
/// replica does not lead: the leader drives).
fn ensure_driver(plane: &Arc<ControlPlane>) -> Result<(), RolloutError> {
    let deadline = Instant::now() + ABORT_LOCK_WAIT;
    loop {
        if plane.rollout_signals().driving() || plane.leader_term().is_none() {
            return Ok(());
        }
        match resume(plane) {
            Ok(Some(id)) => {
                tracing::warn!(rollout = id, "the rollout had no driver: one started");
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Err(RolloutError::Propose(ProposeError::Busy)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Confirms that an operator restarted `server` (manual hook).
pub fn confirm(plane: &ControlPlane, server: &str) -> Result<u64, RolloutError> {
    let stored = plane
        .store()
        .unfinished_rollout()?
        .ok_or(RolloutError::NoneRunning)?;
    if !plane.rollout_signals().confirm(server) {
        return Err(RolloutError::NotWaiting {
            id: stored.id,
            server: server.to_owned(),
        });
    }
    Ok(stored.id)
}

/// A rollout as the API shows it: the record, plus which Envoys still owe an ACK,
/// which server is restarting, and the elapsed time.
pub fn view(plane: &ControlPlane, r: &Rollout) -> Value {
    let mut v = r.to_value();
    let live = !r.state.finished();
    let owing = if live && r.state != Step::Plan {
        let version = ecds_string(plane, recorded_version(plane, r))
            .unwrap_or_else(|_| plane.snapshot().ecds.version.clone());
        let o = owing(plane, &r.waits(), &version);
        json!({
            "pending": o.pending,
            "nacked": o.nacked.iter().map(|(n, e)| json!({"node": n, "error": e})).collect::<Vec<_>>(),
            "not_waited_for": o.unawaited,
            "conflicts": o.conflicts,
        })
    } else {
        Value::Null
    };
    let end = r.finished_at.unwrap_or_else(now_ms);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("owing_ack".into(), owing);
        obj.insert(
            "restarting".into(),
            r.restarting()
                .map(|s| json!(s.server))
                .unwrap_or(Value::Null),
        );
        obj.insert(
            "restarting_all".into(),
            json!(r.restarting_all().map(|s| &s.server).collect::<Vec<_>>()),
        );
        obj.insert(
            "waiting_for_confirm".into(),
            if live {
                // One name (or null), as before; several (parallel manual hooks) joined.
                let w = plane.rollout_signals().waiting_for();
                if w.is_empty() {
                    Value::Null
                } else {
                    Value::String(w.join(", "))
                }
            } else {
                Value::Null
            },
        );
        obj.insert("elapsed_ms".into(), json!((end - r.created_at).max(0)));
    }
    v
}

/// Parses a stored record.
pub fn parse(record: Value) -> Result<Rollout, RolloutError> {
    serde_json::from_value(record).map_err(|e| RolloutError::Corrupt(e.to_string()))
}

/// Where the Envoys stand on the current filter configuration.
#[derive(Debug, Default)]
struct Owing {
    /// Waited for, not ACKed yet.
    pending: Vec<String>,
    /// Waited for, NACKed: `(instance, error)`.
    nacked: Vec<(String, String)>,
    /// Not waited for (edges behind guards), not ACKed yet: reported only.
    unawaited: Vec<String>,
    /// Conflicts among the node ids waited for.
    conflicts: Vec<Conflict>,
}

/// Who owes an ACK of the current filter configuration: every connected instance
/// `waits` counts, and every one in `waits.envoys` (recorded at plan, even
/// disconnected); a node id conflict among them is reported too.
fn owing(plane: &ControlPlane, waits: &Waits, version: &str) -> Owing {
    let required: BTreeSet<&str> = waits.envoys.iter().map(String::as_str).collect();
    let mut o = Owing::default();
    let mut ids = BTreeSet::new();
    for n in plane.registry().nodes() {
        let counted = waits.counts(&n);
        let waited = (n.connected && counted) || required.contains(n.instance.as_str());
        if n.acked(ResourceType::Ecds) == Some(version) && n.connected {
            if waited {
                ids.insert(n.id.clone());
            }
            continue;
        }
        if !waited {
            if n.connected {
                o.unawaited.push(n.instance.clone());
            }
            continue;
        }
        ids.insert(n.id.clone());
        let key = &n.instance;
        if n.nacked(ResourceType::Ecds) == Some(version) {
            let error = n
                .types
                .get(&ResourceType::Ecds)
                .and_then(|s| s.record.nack_error.clone())
                .unwrap_or_default();
            let error = if n.connected {
                error
            } else {
                format!("{error} (disconnected since)")
            };
            o.nacked.push((key.clone(), error));
        } else if !n.connected {
            // Not connected now: it counts once it ACKed this version before.
            if n.acked(ResourceType::Ecds) != Some(version) {
                o.pending.push(format!(
                    "{key} (disconnected; if it is out of service: DELETE /v1/nodes/{key})"
                ));
            }
        } else {
            o.pending.push(key.clone());
        }
    }
    o.conflicts = plane
        .registry()
        .conflicts()
        .into_iter()
        .filter(|c| ids.contains(&c.id))
        .collect();
    o
}

/// The map version the rollout's current step publishes, as recorded (the fence,
/// the new map, the rollback); the served one when none is recorded yet.
fn recorded_version(plane: &ControlPlane, r: &Rollout) -> u64 {
    let recorded = match r.state {
        Step::Fence | Step::Restart => r.fence_version,
        Step::Activate | Step::Done => r.new_version,
        Step::RollingBack | Step::RolledBack => r.rollback_version,
        Step::Plan => None,
    };
    recorded.unwrap_or_else(|| plane.snapshot().map_version)
}

/// The ECDS version string of map version `v`, which this replica serves from now
/// on unless it serves a newer one (a new leader's snapshot may lag the store: an
/// ACK of what it served before is not an ACK of the rollout's version).
fn ecds_version(plane: &ControlPlane, v: u64) -> Result<String, StoreError> {
    if plane.snapshot().map_version < v {
        plane.adopt(v)?;
    }
    ecds_string(plane, v)
}

/// The ECDS version string of map version `v`.
fn ecds_string(plane: &ControlPlane, v: u64) -> Result<String, StoreError> {
    let snapshot = plane.snapshot();
    if snapshot.map_version == v {
        return Ok(snapshot.ecds.version.clone());
    }
    let version = plane
        .store()
        .version(v)?
        .ok_or_else(|| StoreError::Corrupt(format!("version {v} is missing")))?;
    Ok(crate::plane::build_snapshot(plane.config(), &version)
        .ecds
        .version
        .clone())
}

/// Waits until every Envoy that must ACK map version `v` did; `Ok(Err(reason))` on
/// a NACK, a timeout, a node id conflict among them or (when `before_activation`)
/// an abort; `Err` when the version cannot be read.
async fn wait_acks(
    plane: &ControlPlane,
    waits: &Waits,
    v: u64,
    timeout: Duration,
    before_activation: bool,
) -> Result<Result<(), String>, StoreError> {
    let version = ecds_version(plane, v)?;
    Ok(wait_acks_of(plane, waits, v, &version, timeout, before_activation).await)
}

async fn wait_acks_of(
    plane: &ControlPlane,
    waits: &Waits,
    v: u64,
    version: &str,
    timeout: Duration,
    before_activation: bool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut rx = plane.registry().watch();
    let signals = plane.rollout_signals();
    loop {
        rx.borrow_and_update();
        if before_activation && let Some(r) = signals.abort_reason() {
            return Err(r);
        }
        let o = owing(plane, waits, version);
        if before_activation && !o.conflicts.is_empty() {
            let list: Vec<String> = o.conflicts.iter().map(ToString::to_string).collect();
            return Err(list.join("; "));
        }
        if let Some((node, error)) = o.nacked.first() {
            return Err(format!(
                "Envoy {node} refused (NACKed) version {v}: {error}"
            ));
        }
        if o.pending.is_empty() {
            return Ok(());
        }
        let aborted = async {
            if before_activation {
                signals.aborted().await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = tokio::time::timeout_at(deadline, rx.changed()) => {
                if r.is_err() {
                    let o = owing(plane, waits, version);
                    if o.pending.is_empty() && o.conflicts.is_empty() {
                        return Ok(());
                    }
                    return Err(format!(
                        "no ACK of version {v} within {timeout:?} from: {}",
                        o.pending.join(", ")
                    ));
                }
            }
            reason = aborted => return Err(reason),
        }
    }
}

/// How long requests sent before the fence may still be on their way to a server
/// this rollout restarts: `[rollout] drain`, else the longest `connect_timeout`;
/// never less than a guard's connect timeout to its server when a restarted server
/// has a guard (one it passed a request to just before the fence is still waiting
/// for a connection at most that long).
fn drain_time(plane: &ControlPlane, r: &Rollout) -> Duration {
    let drain = plane.config().rollout.drain.unwrap_or_else(|| {
        r.restart
            .iter()
            .filter_map(|s| plane.config().server(&s.server))
            .map(|s| s.connect_timeout)
            .max()
            .unwrap_or_default()
    });
    let nodes = plane.registry().nodes();
    let guarded = r.restart.iter().any(|s| {
        plane.config().server(&s.server).is_some_and(|c| c.guarded)
            || nodes
                .iter()
                .any(|n| n.role.guarded() == Some(s.server.as_str()))
    });
    if guarded {
        drain.max(crate::config::GUARD_CONNECT_TIMEOUT)
    } else {
        drain
    }
}

/// Runs one server's restart hook.
async fn run_hook(
    plane: &ControlPlane,
    server: &str,
    hook: &RestartHook,
    default_timeout: Duration,
    spawned: impl FnOnce(u32),
) -> Result<(), String> {
    match hook {
        RestartHook::Command { argv, timeout } => {
            let timeout = timeout.unwrap_or(default_timeout);
            let Some((program, args)) = argv.split_first() else {
                return Err("the restart command is empty".into());
            };
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .env("SEASHARD_SERVER", server)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot run {program}: {e}"))?;
            if let Some(pid) = child.id() {
                spawned(pid);
            }
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) if status.success() => Ok(()),
                Ok(Ok(status)) => Err(format!("`{}` exited with {status}", argv.join(" "))),
                Ok(Err(e)) => Err(format!("waiting for {program}: {e}")),
                Err(_) => {
                    let _ = child.start_kill();
                    Err(format!(
                        "`{}` did not finish within {timeout:?}",
                        argv.join(" ")
                    ))
                }
            }
        }
        RestartHook::Http {
            method,
            url,
            timeout,
            ca,
            ..
        } => {
            let timeout = timeout.unwrap_or(default_timeout);
            // Messages name the hook, never its secrets (header values, user info,
            // query values), even when the answer echoes them.
            let headers = hook.http_headers()?;
            let secrets = hook.secrets(&headers);
            let shown = daemon::secret::redact_url(url);
            match tokio::time::timeout(
                timeout,
                health::request(method, url, &headers, ca.as_deref()),
            )
            .await
            {
                Ok(Ok((status, _))) if (200..300).contains(&status) => Ok(()),
                Ok(Ok((status, body))) => Err(format!(
                    "{method} {shown} answered {status}: {}",
                    daemon::secret::scrub(&body.chars().take(200).collect::<String>(), &secrets)
                )),
                Ok(Err(e)) => Err(format!(
                    "{method} {shown}: {}",
                    daemon::secret::scrub(&e, &secrets)
                )),
                Err(_) => Err(format!("{method} {shown}: no answer within {timeout:?}")),
            }
        }
        RestartHook::Manual => {
            let signals = plane.rollout_signals();
            signals.set_waiting(server, true);
            tracing::warn!(
                server,
                "restart it now, then run `seactl rollout confirm {server}`"
            );
            let r = tokio::time::timeout(default_timeout, signals.confirmed(server)).await;
            signals.set_waiting(server, false);
            r.map_err(|_| {
                format!("no `seactl rollout confirm {server}` within {default_timeout:?}")
            })
        }
    }
}

/// Waits (at most `timeout`) for a command hook an earlier leader started for
/// `server` on this host, if it still runs: one restart of a server at a time.
async fn wait_for_earlier_hook(server: &str, earlier: &HookProcess, timeout: Duration) {
    if earlier.host != crate::store::etcd::hostname() {
        return;
    }
    let start = Instant::now();
    let mut logged = false;
    while start_time(earlier.pid) == Some(earlier.started) && start.elapsed() < timeout {
        if !logged {
            tracing::warn!(
                server,
                pid = earlier.pid,
                "the restart hook an earlier leader started still runs: waiting for it"
            );
            logged = true;
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// When process `pid` started (field 22 of `/proc/PID/stat`), if it exists.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Polls `url` until it answers `pong` or `timeout` passed.
async fn wait_healthy(url: &str, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let h = health::check(url, HEALTH_CHECK_TIMEOUT.min(timeout)).await;
        if h.up {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "{url} did not answer pong within {timeout:?}: {}",
                h.error.unwrap_or_default()
            ));
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// Runs `f` unless an abort comes first.
async fn abortable<T>(
    plane: &ControlPlane,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let signals = plane.rollout_signals();
    if let Some(r) = signals.abort_reason() {
        return Err(r);
    }
    tokio::select! {
        r = f => r,
        reason = signals.aborted() => Err(reason),
    }
}

/// What a server's restart task reports to the rollout's driver.
enum Restarted {
    /// The command hook runs as this pid.
    Spawned(usize, u32),
    /// The hook succeeded: wait for `pong`.
    Hooked(usize),
    /// It answered `pong`.
    Healthy(usize),
    /// The hook or the health check failed.
    Failed(usize, String),
}

/// Restarts every server not yet healthy, at most `parallel` at once (the rollout's
/// own bound, else `[rollout] max_parallel_restarts`), each with its own hook
/// timeout and health wait; every state change is stored as it happens.
/// `Ok(Some(reason))` when one failed or an abort came: the others still running
/// are stopped (a command hook is killed) and the rollout must roll back.
async fn restart_servers(
    plane: &Arc<ControlPlane>,
    r: &mut Rollout,
) -> Result<Option<String>, RolloutError> {
    let cfg = plane.config().rollout.clone();
    let parallel = r.parallel.unwrap_or(cfg.max_parallel_restarts).max(1);
    let mut todo: std::collections::VecDeque<usize> = (0..r.restart.len())
        .filter(|i| r.restart[*i].state != RestartState::Healthy)
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Restarted>(16);
    let mut tasks = tokio::task::JoinSet::new();
    let mut running = 0usize;
    loop {
        while running < parallel
            && let Some(i) = todo.pop_front()
        {
            let name = r.restart[i].server.clone();
            let Some(server) = plane.config().server(&name).cloned() else {
                tasks.abort_all();
                return Ok(Some(format!("`{name}` is no longer a configured server")));
            };
            // A hook an earlier leader started on this host, maybe still running.
            let earlier = r.restart[i].hook_process.take();
            {
                let s = &mut r.restart[i];
                s.state = RestartState::Restarting;
                s.attempts += 1;
                s.started_at = Some(now_ms());
                s.error = None;
            }
            save(plane, r)?;
            tracing::info!(rollout = r.id, server = %name, "restarting");
            let (plane, tx) = (plane.clone(), tx.clone());
            let timeouts = (cfg.restart_timeout, cfg.health_timeout);
            tasks.spawn(async move {
                if let Some(earlier) = earlier {
                    wait_for_earlier_hook(&name, &earlier, timeouts.0).await;
                }
                let spawned = |pid| {
                    let _ = tx.try_send(Restarted::Spawned(i, pid));
                };
                let report =
                    match run_hook(&plane, &name, &server.restart, timeouts.0, spawned).await {
                        Err(e) => Restarted::Failed(i, format!("restart of {name}: {e}")),
                        Ok(()) => {
                            let _ = tx.send(Restarted::Hooked(i)).await;
                            match wait_healthy(&server.health_url(), timeouts.1).await {
                                Ok(()) => Restarted::Healthy(i),
                                Err(e) => Restarted::Failed(i, format!("health of {name}: {e}")),
                            }
                        }
                    };
                let _ = tx.send(report).await;
            });
            running += 1;
        }
        if running == 0 {
            return Ok(plane
                .rollout_signals()
                .abort_reason()
                .map(|reason| format!("aborted: {reason}")));
        }
        let event = tokio::select! {
            e = rx.recv() => e,
            reason = plane.rollout_signals().aborted() => {
                tasks.abort_all();
                r.stop_restarts("the rollout was aborted");
                return Ok(Some(format!("aborted: {reason}")));
            }
        };
        match event {
            Some(Restarted::Spawned(i, pid)) => {
                r.restart[i].hook_process = start_time(pid).map(|started| HookProcess {
                    host: crate::store::etcd::hostname(),
                    pid,
                    started,
                });
                save(plane, r)?;
            }
            Some(Restarted::Hooked(i)) => {
                plane.metrics().server_restarted();
                r.restart[i].state = RestartState::Restarted;
                r.restart[i].restarted_at = Some(now_ms());
                save(plane, r)?;
            }
            Some(Restarted::Healthy(i)) => {
                running -= 1;
                r.restart[i].state = RestartState::Healthy;
                r.restart[i].healthy_at = Some(now_ms());
                save(plane, r)?;
                tracing::info!(rollout = r.id, server = %r.restart[i].server, "restarted and healthy");
            }
            Some(Restarted::Failed(i, e)) => {
                tasks.abort_all();
                r.restart[i].state = RestartState::Failed;
                r.restart[i].error = Some(e.clone());
                r.stop_restarts("another server's restart failed");
                return Ok(Some(e));
            }
            None => return Ok(Some("the restart tasks ended unexpectedly".into())),
        }
    }
}

/// Writes the rollout's state (committed before the next action).
fn save(plane: &ControlPlane, r: &Rollout) -> Result<(), StoreError> {
    hold_term(plane)?;
    plane
        .store()
        .save_rollout(r.id, r.state.as_str(), &r.to_value())
}

/// `NotLeader` unless this process still leads in the term the rollout is driven
/// under. Checked right before each leader write, which the store fences with the
/// current term: a replica that lost and regained leadership (a new term) cannot
/// carry on an old term's rollout from memory.
fn hold_term(plane: &ControlPlane) -> Result<(), StoreError> {
    if plane.leader_term() == plane.rollout_signals().term() {
        Ok(())
    } else {
        Err(StoreError::NotLeader(None))
    }
}

/// Runs the rollout to its end, holding the change lock.
///
/// Never leaves it unfinished while this replica leads: a failed step (the store
/// cannot be written or read) is tried again from the stored state, after a wait
/// that doubles up to [`STORE_RETRY_MAX`], for as long as it takes. The driver
/// stops only at the end, or when this replica no longer leads in the term it
/// drives under (the new leader resumes the stored step).
async fn drive(plane: Arc<ControlPlane>, _guard: OwnedMutexGuard<()>, mut r: Rollout) {
    let signals = plane.rollout_signals();
    signals.set_driving(true);
    plane.metrics().rollout_running(true);
    signals.set_term(plane.leader_term());
    let mut drained = false;
    let mut wait = STORE_RETRY_FIRST;
    let mut failures = 0u64;
    loop {
        let e = match advance(&plane, &mut r, &mut drained).await {
            Ok(true) => {
                wait = STORE_RETRY_FIRST;
                failures = 0;
                continue;
            }
            Ok(false) => break,
            Err(e) => e,
        };
        if e.not_leader() || hold_term(&plane).is_err() {
            tracing::warn!(
                rollout = r.id,
                step = r.state.as_str(),
                "this replica is no longer the leader: it stops driving the rollout, \
                 which the new leader resumes from its stored step"
            );
            break;
        }
        failures += 1;
        tracing::error!(rollout = r.id, step = r.state.as_str(), failures, error = %e,
            "rollout step failed; retrying from the stored state");
        // The next try starts from what was last committed (what is in memory may
        // be ahead of it, e.g. an end that could not be written): read it back,
        // waiting for the store as long as it fails.
        loop {
            backoff(signals, &mut wait).await;
            if hold_term(&plane).is_err() {
                break;
            }
            match plane
                .store()
                .rollout(r.id)
                .map(|s| s.map(|s| parse(s.record)))
            {
                Ok(Some(Ok(stored))) => {
                    r = stored;
                    break;
                }
                Ok(other) => {
                    let problem = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "the rollout is missing".to_owned(),
                    };
                    tracing::error!(rollout = r.id, %problem, "cannot read the stored rollout");
                }
                Err(e) => {
                    tracing::warn!(rollout = r.id, error = %e, "the store still fails");
                }
            }
        }
    }
    plane.metrics().rollout_running(false);
    signals.set_driving(false);
}

/// Waits `wait` (cut short by an abort asked for meanwhile), then doubles it up to
/// [`STORE_RETRY_MAX`].
async fn backoff(signals: &crate::signals::Signals, wait: &mut Duration) {
    let sleep = tokio::time::sleep(*wait);
    if signals.abort_reason().is_some() {
        sleep.await;
    } else {
        tokio::select! {
            () = sleep => {}
            _ = signals.aborted() => {}
        }
    }
    *wait = (*wait * 2).min(STORE_RETRY_MAX);
}

/// Performs the current step; `Ok(false)` once finished. `drained`: this driver
/// already waited the drain after the fence was ACKed (a retry does not again).
async fn advance(
    plane: &Arc<ControlPlane>,
    r: &mut Rollout,
    drained: &mut bool,
) -> Result<bool, RolloutError> {
    let cfg = plane.config().rollout.clone();
    match r.state {
        Step::Plan => {
            r.enter(Step::Fence, None);
            save(plane, r)?;
        }
        Step::Fence => {
            if let Some(reason) = plane.rollout_signals().abort_reason() {
                r.roll_back(format!("aborted: {reason}"));
                save(plane, r)?;
                return Ok(true);
            }
            if r.fence_version.is_none() {
                let active = plane.active()?;
                if active.version == r.from_version {
                    hold_term(plane)?;
                    let published = plane.publish(
                        active.version,
                        &NewVersion {
                            kind: VersionKind::Fence,
                            map: &r.old_map,
                            fence: &r.fence,
                            author: &r.author,
                            comment: &format!("rollout {}: fence the moved bases", r.id),
                        },
                    );
                    match published {
                        Ok(v) => r.fence_version = Some(v.version),
                        Err(ProposeError::Invalid(problems)) => {
                            // E.g. the configuration changed under a resumed rollout.
                            r.roll_back(format!("the fence cannot be published: {problems}"));
                            save(plane, r)?;
                            return Ok(true);
                        }
                        Err(e) => return Err(e.into()),
                    }
                } else if active.kind == VersionKind::Fence
                    && active.map == r.old_map
                    && active.fence == r.fence
                {
                    r.fence_version = Some(active.version);
                } else {
                    r.roll_back(format!(
                        "the active version changed to {} during the rollout",
                        active.version
                    ));
                    save(plane, r)?;
                    return Ok(true);
                }
                save(plane, r)?;
            }
            let fence = recorded_version(plane, r);
            match wait_acks(plane, &r.waits(), fence, cfg.ack_timeout, true).await? {
                Ok(()) => r.enter(Step::Restart, None),
                Err(reason) => r.roll_back(format!("fence: {reason}")),
            }
            save(plane, r)?;
        }
        Step::Restart => {
            // An Envoy may have reconnected (or this control plane restarted): every
            // one must run the fence before any server restarts.
            let fence = recorded_version(plane, r);
            if let Err(reason) = wait_acks(plane, &r.waits(), fence, cfg.ack_timeout, true).await? {
                r.roll_back(format!("fence: {reason}"));
                save(plane, r)?;
                return Ok(true);
            }
            // A request routed or passed just before the fence may still wait for a
            // connection to its server: let it reach the old process, not the new one.
            // Once per driver: time since the fence was ACKed only grows.
            if !*drained && r.restart.iter().any(|s| s.state != RestartState::Healthy) {
                let drain = drain_time(plane, r);
                if let Err(reason) = abortable(plane, async {
                    tokio::time::sleep(drain).await;
                    Ok(())
                })
                .await
                {
                    r.roll_back(format!("aborted: {reason}"));
                    save(plane, r)?;
                    return Ok(true);
                }
                *drained = true;
            }
            if let Some(reason) = restart_servers(plane, r).await? {
                r.roll_back(reason);
                save(plane, r)?;
                return Ok(true);
            }
            if let Some(reason) = plane.rollout_signals().abort_reason() {
                r.roll_back(format!("aborted: {reason}"));
            } else {
                r.enter(Step::Activate, None);
            }
            save(plane, r)?;
        }
        Step::Activate => {
            if r.new_version.is_none() {
                let active = plane.active()?;
                if active.map == r.new_map && active.fence.is_empty() {
                    r.new_version = Some(active.version);
                } else {
                    hold_term(plane)?;
                    let comment = if r.comment.is_empty() {
                        format!("rollout {}", r.id)
                    } else {
                        format!("rollout {}: {}", r.id, r.comment)
                    };
                    let v = plane.publish(
                        active.version,
                        &NewVersion::unfenced(VersionKind::Map, &r.new_map, &r.author, &comment),
                    )?;
                    r.new_version = Some(v.version);
                }
                save(plane, r)?;
            }
            let new = recorded_version(plane, r);
            if let Err(reason) = wait_acks(plane, &r.waits(), new, cfg.ack_timeout, false).await? {
                // Safe: an Envoy still on the fence answers 503 for the moved bases.
                r.warnings.push(format!("activation: {reason}"));
            }
            finish(plane, r, Step::Done)?;
            return Ok(false);
        }
        Step::RollingBack => {
            if r.rollback_version.is_none() {
                let active = plane.active()?;
                if active.map == r.old_map && active.fence.is_empty() {
                    // Never fenced, or the rollback is already published.
                    if active.version != r.from_version {
                        r.rollback_version = Some(active.version);
                    }
                } else {
                    hold_term(plane)?;
                    let v = plane.publish(
                        active.version,
                        &NewVersion::unfenced(
                            VersionKind::Rollback,
                            &r.old_map,
                            &r.author,
                            &format!(
                                "rollout {} rolled back: {}",
                                r.id,
                                r.reason.as_deref().unwrap_or("")
                            ),
                        ),
                    )?;
                    r.rollback_version = Some(v.version);
                }
                save(plane, r)?;
            }
            let connected = Waits {
                envoys: Vec::new(),
                guarded: r.guarded.clone(),
            };
            let rollback = recorded_version(plane, r);
            if let Err(reason) =
                wait_acks(plane, &connected, rollback, cfg.ack_timeout, false).await?
            {
                r.warnings.push(format!("rollback: {reason}"));
            }
            finish(plane, r, Step::RolledBack)?;
            return Ok(false);
        }
        Step::Done | Step::RolledBack => return Ok(false),
    }
    Ok(true)
}

/// Ends the rollout: its final state, every server's `may_hold`, the audit entry,
/// in one transaction.
fn finish(plane: &ControlPlane, r: &mut Rollout, end: Step) -> Result<(), RolloutError> {
    r.enter(end, r.reason.clone());
    let now = now_ms();
    if let Some(last) = r.steps.last_mut() {
        last.finished_at = Some(now);
    }
    r.finished_at = Some(now);
    let restart_ms: i64 = r
        .steps
        .iter()
        .filter(|s| s.step == Step::Restart)
        .map(|s| s.finished_at.unwrap_or(now) - s.started_at)
        .sum();
    r.restart_ms = Some(restart_ms.max(0) as u64);
    r.overhead_ms = Some((now - r.created_at - restart_ms).max(0) as u64);
    let mut may_hold = Vec::new();
    for s in &plane.config().servers {
        let restarted = r
            .restart
            .iter()
            .find(|x| x.server == s.name && x.state == RestartState::Healthy);
        let current = plane.store().may_hold(&s.name)?;
        match (end, restarted, r.new_version) {
            (Step::Done, Some(x), Some(v)) => {
                may_hold.push((s.name.clone(), vec![v], x.healthy_at.or(Some(now))));
            }
            (Step::Done, None, Some(v)) => {
                if let Some(mut h) = current {
                    if !h.contains(&v) {
                        h.push(v);
                    }
                    may_hold.push((s.name.clone(), h, None));
                }
            }
            (Step::RolledBack, Some(x), _) => {
                may_hold.push((
                    s.name.clone(),
                    vec![r.from_version],
                    x.healthy_at.or(Some(now)),
                ));
            }
            _ => {}
        }
    }
    let version = match end {
        Step::Done => r.new_version,
        _ => r.rollback_version,
    };
    let detail = json!({
        "rollout": r.id,
        "reason": r.reason,
        "restarted": r.restart.iter().filter(|s| s.state == RestartState::Healthy).map(|s| &s.server).collect::<Vec<_>>(),
        "overhead_ms": r.overhead_ms,
        "restart_ms": r.restart_ms,
        "warnings": r.warnings,
    });
    let record = r.to_value();
    hold_term(plane)?;
    plane.store().finish_rollout(&FinishRollout {
        id: r.id,
        state: end.as_str(),
        record: &record,
        may_hold: &may_hold,
        actor: &r.author,
        version,
        detail: &detail,
    })?;
    plane.metrics().rollout_finished(end == Step::Done);
    tracing::info!(
        rollout = r.id,
        state = end.as_str(),
        overhead_ms = r.overhead_ms,
        restart_ms = r.restart_ms,
        reason = r.reason.as_deref().unwrap_or(""),
        "rollout finished"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_is_known_by_its_start_time_across_exec_and_not_after_it_ends() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 0.2; exec sleep 30"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = start_time(pid).expect("a running process has a start time");
        // After the exec: another command line, the same process.
        std::thread::sleep(Duration::from_millis(500));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(!cmdline.starts_with(b"sh"), "the hook did not exec yet");
        assert_eq!(start_time(pid), Some(started));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(start_time(pid), None);
    }
}
