//! Where the control plane keeps its state, behind one seam: the [`Store`] trait.
//!
//! ```text
//!             ┌──────────── Store ────────────┐
//!  plane,     │ versions · audit · rollouts    │   SqliteStore: one file, one process
//!  rollout ──▶│ may_hold · nodes               │
//!  api, xds   │ leadership · watch_active      │   EtcdStore: several replicas, one
//!             │ watch_nodes                    │   leader (lease), watches
//!             └────────────────────────────────┘
//! ```
//!
//! Every version is one record, numbered from one sequence: a new map, and (with
//! rollouts) the fenced old map and a rollback, each get the next number, so the
//! number Envoy reports (`x-shard-map-version`) names exactly one configuration and
//! content once NACKed is never sent again under a number. The highest is the
//! configuration every Envoy must run.
//!
//! **Leader writes** (versions, rollouts and their steps, `may_hold`, abort requests,
//! audit) are made by the leader only. SQLite's single process always leads; with
//! etcd each such write is a transaction conditioned on the leader key the writer
//! created (its fencing token), so a deposed leader's late write is refused with
//! [`StoreError::NotLeader`], whatever the clocks say. **Node records** are written
//! by the replica whose streams the Envoys hold: [`Store::load_nodes`] gives this
//! replica's, [`Store::watch_nodes`] everyone else's.
//!
//! The trait is synchronous: SQLite's calls are local and short, and each etcd call
//! runs on the store's own runtime under a deadline (`[store] timeout`), so no call
//! blocks its caller longer than that.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shardmap::{Fence, RouterConfig, ShardMap};
use tokio::sync::watch;

pub mod etcd;
mod sqlite;

pub use etcd::EtcdStore;
pub use sqlite::SqliteStore;

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: corrupt row: {0}")]
    Corrupt(String),
    #[error("the active version is {active}, not {expected}: someone else changed the map")]
    Conflict { expected: u64, active: u64 },
    #[error("store: a thread panicked while holding the database")]
    Poisoned,
    /// etcd cannot be reached, or has lost its majority: nothing can change.
    #[error("etcd is unavailable: {0}")]
    Unavailable(String),
    /// etcd answered with an error.
    #[error("etcd: {0}")]
    Etcd(String),
    /// This replica is not the leader (or no longer is): the write was refused by
    /// the leader's fencing token.
    #[error("this control plane replica is not the leader{}", .0.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader(Option<String>),
}

/// What a version is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionKind {
    /// The first map, from the configuration.
    Initial,
    /// A map pushed by an operator.
    Map,
    /// The active map with the bases of a rollout fenced.
    Fence,
    /// The map before a failed rollout, pushed again.
    Rollback,
}

impl VersionKind {
    fn as_str(self) -> &'static str {
        match self {
            VersionKind::Initial => "initial",
            VersionKind::Map => "map",
            VersionKind::Fence => "fence",
            VersionKind::Rollback => "rollback",
        }
    }

    fn parse(s: &str) -> Option<VersionKind> {
        Some(match s {
            "initial" => VersionKind::Initial,
            "map" => VersionKind::Map,
            "fence" => VersionKind::Fence,
            "rollback" => VersionKind::Rollback,
            _ => return None,
        })
    }
}

/// One stored version: a map, its fence, who pushed it and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub version: u64,
    pub kind: VersionKind,
    pub map: ShardMap,
    pub fence: Fence,
    pub author: String,
    pub comment: String,
    /// Unix time, milliseconds.
    pub created_at: i64,
}

impl Version {
    /// The filter configuration of this version, as `[filter]` says (routing header,
    /// retry-after, version header).
    pub fn router_config(&self, filter: &crate::config::FilterConfig) -> RouterConfig {
        RouterConfig {
            header: filter.header.clone(),
            retry_after: filter.retry_after,
            version_header: filter.version_header,
            fence: self.fence.clone(),
            ..RouterConfig::new(self.version, self.map.clone())
        }
    }
}

/// A version to append.
#[derive(Debug, Clone)]
pub struct NewVersion<'a> {
    pub kind: VersionKind,
    pub map: &'a ShardMap,
    pub fence: &'a Fence,
    pub author: &'a str,
    pub comment: &'a str,
}

impl<'a> NewVersion<'a> {
    /// A version with no fence: its map routes every base as it says.
    pub fn unfenced(
        kind: VersionKind,
        map: &'a ShardMap,
        author: &'a str,
        comment: &'a str,
    ) -> NewVersion<'a> {
        static NO_FENCE: Fence = Fence {
            slots: Vec::new(),
            pins: Vec::new(),
        };
        NewVersion {
            kind,
            map,
            fence: &NO_FENCE,
            author,
            comment,
        }
    }
}

/// An audit entry to record: who did what, to which version.
#[derive(Debug, Clone)]
pub struct NewAudit<'a> {
    pub actor: &'a str,
    /// `rollout.begin`, `node.forget`, ...
    pub action: &'a str,
    pub version: Option<u64>,
    pub detail: serde_json::Value,
}

/// The ACK/NACK state of one node for one resource type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeRecord {
    pub acked_version: Option<String>,
    pub acked_at: Option<i64>,
    pub nacked_version: Option<String>,
    pub nack_error: Option<String>,
    pub nacked_at: Option<i64>,
}

/// A node instance as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The instance key (`id@ip`); a bare node id in rows stored before instances.
    pub id: String,
    /// The Envoy's node id.
    pub node_id: String,
    /// The peer address (IP, or `rest`); `None` in rows stored before instances.
    pub peer: Option<String>,
    /// `edge` or `guard:SERVER`.
    pub role: String,
    pub cluster: String,
    pub first_seen: i64,
    /// Set while connected.
    pub connected_since: Option<i64>,
    pub last_seen: i64,
    /// `grpc` or `rest`.
    pub transport: String,
    /// Per type (`ecds`, `cds`).
    pub types: Vec<(String, TypeRecord)>,
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub version: Option<u64>,
    pub detail: serde_json::Value,
}

/// Now, as unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Who may make leader writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "role")]
pub enum Leadership {
    /// This replica leads: it runs rollouts and publishes versions. `term` is its
    /// fencing token (etcd: the leader key's create revision; SQLite: 0).
    Leader { term: i64 },
    /// Another replica leads (or none has been elected yet): changes go to it.
    Follower { leader: Option<LeaderInfo> },
    /// The store cannot be reached or has no majority: nothing may change.
    Unavailable { reason: String },
}

impl Leadership {
    pub fn is_leader(&self) -> bool {
        matches!(self, Leadership::Leader { .. })
    }
}

/// Whether this replica can show that it is current: that no newer version than
/// the one it knows exists (see ARCHITECTURE, "A map version never goes back").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Currency {
    /// A recent linearizable read found `active` the store's active version (etcd:
    /// within the keep-alive period of a held lease; SQLite: always, 0 standing for
    /// "whatever is served", the one process being the only writer).
    Current { active: u64 },
    /// It cannot: no etcd session, the lease lost, no answer in time.
    Unknown { reason: String },
}

/// The leader as it announces itself in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// Its replica name.
    pub replica: String,
    /// Its HTTP API, where the other replicas forward changes.
    pub api: String,
    /// The host it runs on and its pid (a new leader on the same host can tell
    /// whether a restart hook the old one started is still running).
    pub host: String,
    pub pid: u32,
}

/// A node record written by another replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteNode {
    /// The replica holding (or last holding) the Envoy's stream.
    pub replica: String,
    /// That replica is alive (its membership lease holds): a record saying
    /// `connected` from a dead replica means "last seen there".
    pub live: bool,
    pub record: NodeRecord,
}

/// What the store is, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreInfo {
    /// `sqlite` or `etcd`.
    pub kind: &'static str,
    /// The file, or the endpoints and prefix.
    pub location: String,
    /// This replica's name (etcd).
    pub replica: Option<String>,
}

/// The control plane's state. See the module documentation.
pub trait Store: Send + Sync {
    /// What and where this store is.
    fn info(&self) -> StoreInfo;

    /// The highest version: what every Envoy must run. `None` in a new store.
    fn active(&self) -> Result<Option<Version>, StoreError>;
    /// One version.
    fn version(&self, version: u64) -> Result<Option<Version>, StoreError>;
    /// The latest `limit` versions, newest first.
    fn history(&self, limit: u32) -> Result<Vec<Version>, StoreError>;
    /// Appends the next version, if the active one is still `expected` (0: none yet),
    /// with its audit entry, atomically. Returns the new version number. A leader
    /// write, except the very first version (`expected` 0), which any replica may
    /// seed: only one can.
    fn append_version(&self, expected: u64, new: &NewVersion<'_>) -> Result<u64, StoreError>;

    /// Records an audit entry on its own (a leader write).
    fn audit(&self, entry: &NewAudit<'_>) -> Result<(), StoreError>;
    /// The latest `limit` audit entries, newest first.
    fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;

    /// Writes this replica's given node records.
    fn save_nodes(&self, nodes: &[NodeRecord]) -> Result<(), StoreError>;
    /// This replica's node records.
    fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Forgets node instances (Envoys taken out of service), by instance key, on
    /// every replica. Returns how many records were removed.
    fn delete_nodes(&self, keys: &[String]) -> Result<usize, StoreError>;

    /// Records a new rollout (its state and JSON record, whose `id` is set to the
    /// new one's) atomically; returns its id. A leader write.
    fn insert_rollout(&self, state: &str, record: &serde_json::Value) -> Result<u64, StoreError>;
    /// Rewrites a rollout's state and record (committed on return). A leader write.
    fn save_rollout(
        &self,
        id: u64,
        state: &str,
        record: &serde_json::Value,
    ) -> Result<(), StoreError>;
    /// One rollout: its record and the abort reason, if one was asked for.
    fn rollout(&self, id: u64) -> Result<Option<StoredRollout>, StoreError>;
    /// The latest `limit` rollouts, newest first.
    fn rollouts(&self, limit: u32) -> Result<Vec<StoredRollout>, StoreError>;
    /// The rollout that has not finished (`done` or `rolled_back`), if any.
    fn unfinished_rollout(&self) -> Result<Option<StoredRollout>, StoreError>;
    /// Records that an abort was asked for (it survives a restart or a takeover).
    fn request_abort(&self, id: u64, reason: &str) -> Result<(), StoreError>;
    /// Ends a rollout atomically: its final state and record, every server's new
    /// `may_hold` (with the restart time of those seashard restarted), and the audit
    /// entry. A leader write.
    fn finish_rollout(&self, finish: &FinishRollout<'_>) -> Result<(), StoreError>;

    /// The map versions `server` may hold since seashard last restarted it; `None`
    /// when seashard never restarted it (it may hold anything).
    fn may_hold(&self, server: &str) -> Result<Option<Vec<u64>>, StoreError>;
    /// Every server's stored state.
    fn server_states(&self) -> Result<Vec<ServerState>, StoreError>;

    /// Where this replica's API listens, once it does (`[store] advertise` wins):
    /// with etcd a replica campaigns only from then on, since as the leader it
    /// must be reachable by the others. SQLite: nothing to do.
    fn advertise(&self, _api: &str) {}

    /// Who may make leader writes, kept current.
    fn leadership(&self) -> watch::Receiver<Leadership>;
    /// The active version number, kept current (another replica's writes included).
    fn watch_active(&self) -> watch::Receiver<u64>;
    /// The node records of the other replicas, kept current.
    fn watch_nodes(&self) -> watch::Receiver<Arc<Vec<RemoteNode>>>;
    /// Whether this replica can show that it is current, kept current. By default
    /// (SQLite: one process, the only writer) always.
    fn currency(&self) -> watch::Receiver<Currency> {
        watch::channel(Currency::Current { active: 0 }).1
    }
}

/// Opens the store `config` names: the SQLite file, or etcd (connecting, and
/// starting this replica's membership and leader campaign).
pub fn open(config: &crate::config::Config) -> Result<Arc<dyn Store>, StoreError> {
    match config.store.kind {
        crate::config::StoreKind::Sqlite => Ok(Arc::new(SqliteStore::open(&config.store.path)?)),
        crate::config::StoreKind::Etcd => Ok(Arc::new(EtcdStore::connect(config)?)),
    }
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRollout {
    pub id: u64,
    pub state: String,
    pub record: serde_json::Value,
    /// Why an abort was asked for, when one was.
    pub abort_requested: Option<String>,
}

/// A server's stored rollout state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerState {
    pub name: String,
    /// The map versions it may hold since seashard last restarted it.
    pub may_hold: Vec<u64>,
    pub last_restart_at: Option<i64>,
    pub last_rollout: Option<u64>,
}

/// What ending a rollout writes, in one transaction.
#[derive(Debug)]
pub struct FinishRollout<'a> {
    pub id: u64,
    /// `done` or `rolled_back`.
    pub state: &'a str,
    pub record: &'a serde_json::Value,
    /// `(server, may_hold, restarted_at)`: `restarted_at` set for the servers seashard
    /// restarted (their row is created or reset); otherwise only an existing row changes.
    pub may_hold: &'a [(String, Vec<u64>, Option<i64>)],
    pub actor: &'a str,
    pub version: Option<u64>,
    pub detail: &'a serde_json::Value,
}
