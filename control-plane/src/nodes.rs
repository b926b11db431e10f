//! Every Envoy node and what it runs: per resource type, the last version it ACKed,
//! the last it NACKed with Envoy's `error_detail`, and what it was last sent.
//!
//! The state-of-the-world protocol, per stream and type: a request without a nonce
//! opens a subscription (its `version_info` is what the Envoy already runs, empty for
//! a fresh process); a request carrying the nonce of the latest response ACKs it, or
//! NACKs it when it has an `error_detail`; a request with an older nonce is stale and
//! ignored. A node is sent the current version when it does not run it yet, unless it
//! NACKed exactly that content: Envoy reports content sent again after a NACK as
//! applied while keeping its old config, so it is never resent (a new version is).
//!
//! **Instances, not node ids.** Two Envoys given one node id (a copied bootstrap) must
//! never be counted as one: one of them could ACK a fence the other never saw. So the
//! registry tracks *instances*: a node id as seen from one peer address. A stream's
//! instance is `id@ip`; a reconnect from the same address is the same instance, a
//! stream from another address is another one. A node id held by two instances, or by
//! two live streams at once, is a [`Conflict`]: shown, never merged, and a rollout
//! that must wait for that id refuses to run. A disconnected instance is kept (it may
//! still serve with an old map) until it reconnects or is forgotten.
//!
//! **REST pollers are instances too**, whatever the transport: `id@rest:ip`, by the
//! peer address of the poll (see [`rest_instance_key`]), so two Envoys polling with
//! one node id from two addresses conflict exactly as two streams do. Decided:
//! - *Live*: a REST poll carries no connection, so a poller counts as connected from
//!   a poll until `expiry` passes without one at this replica
//!   ([`Registry::expire_pollers`], 60 s in `seactl serve`); then it is kept as a
//!   disconnected instance, which a rollout still waits for (it may still serve).
//! - *A poller and a stream of one node id* are two instances (their keys differ
//!   even from one address: one Envoy speaks one transport), so a conflict until one
//!   is forgotten; an Envoy moved from REST to gRPC is forgotten under its old key.
//! - *A poller whose address changes* (restart on another host, a NAT with several
//!   egress addresses) is a new instance: a conflict with the old one until that is
//!   forgotten (`DELETE /v1/nodes/{instance}`), never a silent merge. Behind a NAT
//!   that spreads one Envoy's polls over addresses, use gRPC (one stream, one address).
//! - *Two pollers behind one address* (one host, one NAT address) are one instance:
//!   a poll tells nothing else apart. Give each Envoy its own node id there.
//! - *Several replicas*: a poller's polls are spread over the replicas by design, so
//!   one REST instance connected to two replicas is not a conflict; its record seen
//!   last stands.
//!
//! An instance subscribing to a guard's filter configuration
//! (`{filter}.guard.{server}`) is a **guard** of that server.
//!
//! [`Registry`] is the in-memory truth (waiters watch it); changed nodes are marked
//! dirty and written to the store in batches by [`Registry::take_dirty`]'s caller.
//!
//! **Several replicas** (etcd): the Envoys whose streams other replicas hold are
//! known from their records in the store ([`Registry::set_remote`]). Every view
//! (nodes, conflicts, tallies, convergence) takes, per instance, the record that
//! stands now: a connected one first (a record of a dead replica is not
//! connected: the Envoy was last seen there), else the one seen last. So the
//! leader waits on every Envoy, whichever replica it talks to, and one instance
//! connected to two replicas at once is a conflict.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::resources::{ResourceType, Snapshot, ecds_map_version};
use crate::store::{NodeRecord, RemoteNode, TypeRecord, now_ms};

/// The parts of a `DiscoveryRequest` the tracking reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// `(id, cluster)`: on the first request of a stream at least.
    pub node: Option<(String, String)>,
    pub type_url: String,
    pub version_info: String,
    pub response_nonce: String,
    pub resource_names: Vec<String>,
    /// Envoy's reason for a NACK.
    pub error_detail: Option<String>,
}

/// One REST-JSON `DiscoveryRequest`, as [`Registry::rest_poll`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct RestPoll<'a> {
    pub id: &'a str,
    pub cluster: &'a str,
    /// The socket address the poll came from (`None`: unknown, one `unknown` peer).
    pub peer: Option<SocketAddr>,
    pub t: ResourceType,
    /// The version the node runs (empty: nothing yet).
    pub running: &'a str,
    /// Its `error_detail`, if any.
    pub error: Option<&'a str>,
    /// The resource names it asks for: `{filter}.guard.{server}` makes it a guard.
    pub names: &'a [String],
}

/// What a request meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A subscription opened; the node says it runs `version` (empty: nothing yet).
    Subscribe {
        version: String,
    },
    Ack {
        version: String,
    },
    /// The node refused `version` and still runs `running`.
    Nack {
        version: String,
        running: String,
        error: String,
    },
    /// An answer to an older response: nothing to do.
    Stale,
    /// A type this control plane does not serve.
    UnknownType,
}

/// A protocol error that ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("the first request of a stream must carry the node (id and cluster)")]
    NoNode,
    #[error("the node id is empty")]
    EmptyNodeId,
    /// Node ids and clusters are names, not payloads.
    #[error("the node {what} is {len} bytes long: at most {MAX_NODE_NAME} are accepted")]
    NodeNameTooLong { what: &'static str, len: usize },
}

/// The longest node id or node cluster accepted, in bytes.
pub const MAX_NODE_NAME: usize = 256;

/// One stream's (or one REST poller's) view of one type.
#[derive(Debug, Clone, Default)]
struct StreamType {
    subscribed: bool,
    names: Vec<String>,
    /// The nonce of the latest response sent.
    nonce: Option<String>,
    /// The version of the latest response sent, or the version the node said it runs.
    version: Option<String>,
    /// The stream opened with no version: a fresh Envoy that never saw any content.
    fresh: bool,
}

/// The per-connection state: which instance, and per type what was sent.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    /// The peer's socket address, when the transport knows it.
    peer: Option<SocketAddr>,
    /// The instance key (`id@ip`), once the first request named the node.
    key: Option<String>,
    node: Option<String>,
    types: HashMap<ResourceType, StreamType>,
}

impl Stream {
    /// A stream from `peer`.
    pub fn new(peer: Option<SocketAddr>) -> Stream {
        Stream {
            peer,
            ..Stream::default()
        }
    }

    /// The node id, once the first request named it.
    pub fn node_id(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The instance key, once the first request named the node.
    pub fn instance(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The resource names the node asked for of type `t`.
    pub fn names(&self, t: ResourceType) -> &[String] {
        self.types
            .get(&t)
            .map(|s| s.names.as_slice())
            .unwrap_or(&[])
    }
}

/// A node's state for one type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeState {
    #[serde(flatten)]
    pub record: TypeRecord,
    /// The version last sent and not answered yet.
    pub pending_version: Option<String>,
}

/// What an Envoy is, from the filter configuration it asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "server")]
pub enum Role {
    /// Routes requests to servers (edge or sidecar).
    #[default]
    Edge,
    /// Guards one server: passes only requests for bases that server owns.
    Guard(String),
}

impl Role {
    /// The guarded server, for a guard.
    pub fn guarded(&self) -> Option<&str> {
        match self {
            Role::Guard(s) => Some(s),
            Role::Edge => None,
        }
    }

    fn as_stored(&self) -> String {
        match self {
            Role::Edge => "edge".into(),
            Role::Guard(s) => format!("guard:{s}"),
        }
    }

    fn from_stored(s: Option<&str>) -> Role {
        match s.and_then(|s| s.strip_prefix("guard:")) {
            Some(server) => Role::Guard(server.to_owned()),
            None => Role::Edge,
        }
    }
}

/// The key of the instance of node `id` whose streams come from `ip`.
pub fn instance_key(id: &str, ip: &str) -> String {
    format!("{id}@{ip}")
}

/// The key of the instance of node `id` polling REST xDS from `ip`.
pub fn rest_instance_key(id: &str, ip: &str) -> String {
    format!("{id}@{REST}:{ip}")
}

/// The transport of REST pollers, and the peer of their records stored when all of
/// a node id's pollers were one instance (`id@rest`).
const REST: &str = "rest";

/// One Envoy instance (a node id at one peer address), as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// `id@ip` (`id@rest:ip` for a REST poller): what rollouts wait for and
    /// `DELETE /v1/nodes/{key}` forgets.
    pub instance: String,
    pub id: String,
    /// The peer's address (IP); `rest` for a REST poller or `null` when stored by an
    /// older control plane.
    pub peer: Option<String>,
    /// The socket addresses of its live streams (a live REST poller: of its last poll).
    pub streams_from: Vec<String>,
    pub role: Role,
    pub cluster: String,
    pub transport: String,
    pub connected: bool,
    /// Unix ms; set while connected.
    pub connected_since: Option<i64>,
    pub first_seen: i64,
    pub last_seen: i64,
    /// Open streams (gRPC) for this node id.
    pub streams: u32,
    pub types: BTreeMap<ResourceType, TypeState>,
    /// The control plane replica holding its stream, when another one does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

impl Node {
    fn new(key: &str, id: &str, ip: &str, cluster: &str, transport: &str, now: i64) -> Node {
        Node {
            instance: key.to_owned(),
            id: id.to_owned(),
            peer: Some(ip.to_owned()),
            streams_from: Vec::new(),
            role: Role::Edge,
            cluster: cluster.to_owned(),
            transport: transport.to_owned(),
            connected: false,
            connected_since: None,
            first_seen: now,
            last_seen: now,
            streams: 0,
            types: BTreeMap::new(),
            replica: None,
        }
    }

    /// The version of type `t` the node last ACKed.
    pub fn acked(&self, t: ResourceType) -> Option<&str> {
        self.types.get(&t)?.record.acked_version.as_deref()
    }

    /// The version of type `t` the node last NACKed.
    pub fn nacked(&self, t: ResourceType) -> Option<&str> {
        self.types.get(&t)?.record.nacked_version.as_deref()
    }

    fn record(&self) -> NodeRecord {
        NodeRecord {
            id: self.instance.clone(),
            node_id: self.id.clone(),
            peer: self.peer.clone(),
            role: self.role.as_stored(),
            cluster: self.cluster.clone(),
            first_seen: self.first_seen,
            connected_since: self.connected_since,
            last_seen: self.last_seen,
            transport: self.transport.clone(),
            types: self
                .types
                .iter()
                .map(|(t, s)| (t.as_str().to_owned(), s.record.clone()))
                .collect(),
        }
    }

    fn from_record(r: NodeRecord) -> Node {
        let types = r
            .types
            .into_iter()
            .filter_map(|(t, record)| {
                Some((
                    ResourceType::parse(&t)?,
                    TypeState {
                        record,
                        pending_version: None,
                    },
                ))
            })
            .collect();
        Node {
            id: r.node_id,
            instance: r.id,
            peer: r.peer,
            streams_from: Vec::new(),
            role: Role::from_stored(Some(&r.role)),
            cluster: r.cluster,
            transport: r.transport,
            connected: false,
            connected_since: None,
            first_seen: r.first_seen,
            last_seen: r.last_seen,
            streams: 0,
            types,
            replica: None,
        }
    }

    /// Another replica's record: connected only while that replica lives.
    fn from_remote(r: &RemoteNode) -> Node {
        let connected = r.live && r.record.connected_since.is_some();
        let mut n = Node::from_record(r.record.clone());
        n.connected = connected;
        n.connected_since = if connected {
            r.record.connected_since
        } else {
            None
        };
        n.streams = u32::from(connected);
        n.replica = Some(r.replica.clone());
        n
    }

    /// Which of two records of one instance stands now: the connected one, else the
    /// one seen last.
    fn stands_over(&self, other: &Node) -> bool {
        (self.connected, self.last_seen) >= (other.connected, other.last_seen)
    }
}

/// Where the connected nodes stand on one version of one type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Convergence {
    pub version: String,
    pub acked: Vec<String>,
    pub pending: Vec<String>,
    /// `(node, error_detail)`.
    pub nacked: Vec<(String, String)>,
}

impl Convergence {
    /// Every connected node ACKed (vacuously true with none connected).
    pub fn complete(&self) -> bool {
        self.pending.is_empty() && self.nacked.is_empty()
    }
}

/// A node id held by more than one Envoy: two instances, or two live streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub id: String,
    pub instances: Vec<ConflictPeer>,
}

/// One holder of a conflicting node id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConflictPeer {
    pub instance: String,
    pub connected: bool,
    /// The socket addresses of its live streams (a REST poller: of its last poll).
    pub streams_from: Vec<String>,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node id `{}` is held by more than one Envoy:", self.id)?;
        for (i, p) in self.instances.iter().enumerate() {
            let sep = if i == 0 { " " } else { "; " };
            if p.connected {
                write!(
                    f,
                    "{sep}{} (connected, streams from {})",
                    p.instance,
                    p.streams_from.join(", ")
                )?;
            } else {
                write!(f, "{sep}{} (disconnected)", p.instance)?;
            }
        }
        write!(
            f,
            ". Give each Envoy its own node id (`seactl envoy-bootstrap --node-id`), and \
             forget one taken out of service (DELETE /v1/nodes/{{instance}})"
        )
    }
}

/// Every node instance, in memory; the source of truth for waiters and the API.
pub struct Registry {
    nodes: Mutex<Inner>,
    changed: watch::Sender<u64>,
    /// The filter configuration name: `{filter}.guard.{server}` names a guard's.
    filter_name: String,
}

#[derive(Default)]
struct Inner {
    /// By instance key.
    nodes: BTreeMap<String, Node>,
    dirty: HashSet<String>,
    /// Instance keys to delete from the store (adopted legacy records).
    removed: HashSet<String>,
    generation: u64,
    /// Where the connected instances stand, per type: kept up to date at every
    /// change, so a waiter learns whether a version converged in O(1).
    tallies: [Tally; 2],
    /// What each instance adds to `tallies` now.
    counted: HashMap<String, [Standing; 2]>,
    /// The instances other replicas hold or held, by instance key (one record
    /// each: the one that stands, see [`Node::stands_over`]).
    remote: BTreeMap<String, Node>,
}

impl Inner {
    /// The record of `key` that stands now: this replica's or another's.
    fn effective(&self, key: &str) -> Option<&Node> {
        match (self.nodes.get(key), self.remote.get(key)) {
            (Some(l), Some(r)) => Some(if l.stands_over(r) { l } else { r }),
            (l, r) => l.or(r),
        }
    }

    /// Every instance, as it stands, sorted by instance key.
    fn view(&self) -> impl Iterator<Item = &Node> {
        let keys: std::collections::BTreeSet<&String> =
            self.nodes.keys().chain(self.remote.keys()).collect();
        keys.into_iter().filter_map(|k| self.effective(k))
    }

    /// Instances with a stream here and to another replica at once (a REST
    /// poller's polls are spread over the replicas: not one of these).
    fn doubly_connected(&self, key: &str) -> bool {
        matches!((self.nodes.get(key), self.remote.get(key)),
            (Some(l), Some(r)) if l.connected && r.connected && l.transport != REST)
    }
}

/// What one connected instance adds to its type's [`Tally`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Standing {
    connected: bool,
    acked: Option<String>,
    /// NACKed, and not also ACKed since (an ACK of the same version wins).
    nacked: Option<String>,
}

/// Connected instances of one type: how many, and how many ACKed or NACKed each
/// version.
#[derive(Debug, Default)]
struct Tally {
    connected: usize,
    acked: HashMap<String, usize>,
    nacked: HashMap<String, usize>,
}

impl Tally {
    fn apply(&mut self, s: &Standing, sign: isize) {
        if !s.connected {
            return;
        }
        let add = |n: &mut usize| *n = n.saturating_add_signed(sign);
        add(&mut self.connected);
        for (v, map) in [(&s.acked, &mut self.acked), (&s.nacked, &mut self.nacked)] {
            if let Some(v) = v {
                let n = map.entry(v.clone()).or_default();
                add(n);
                if *n == 0 {
                    map.remove(v);
                }
            }
        }
    }

    /// `(acked, nacked, connected)` for `version`.
    fn of(&self, version: &str) -> (usize, usize, usize) {
        (
            self.acked.get(version).copied().unwrap_or(0),
            self.nacked.get(version).copied().unwrap_or(0),
            self.connected,
        )
    }
}

/// The index of `t` in `ResourceType::ALL`, and so in `Inner::tallies`.
fn slot(t: ResourceType) -> usize {
    match t {
        ResourceType::Cds => 0,
        ResourceType::Ecds => 1,
    }
}

fn standing(n: &Node, t: ResourceType) -> Standing {
    let acked = n.acked(t).map(str::to_owned);
    let nacked = n.nacked(t).filter(|v| Some(*v) != acked.as_deref());
    Standing {
        connected: n.connected,
        nacked: nacked.map(str::to_owned),
        acked,
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(Vec::new(), crate::config::DEFAULT_FILTER_NAME)
    }
}

impl Registry {
    /// A registry holding the stored nodes (all disconnected until they reconnect).
    pub fn new(stored: Vec<NodeRecord>, filter_name: &str) -> Registry {
        let nodes = stored
            .into_iter()
            .map(|r| (r.id.clone(), Node::from_record(r)))
            .collect();
        Registry {
            nodes: Mutex::new(Inner {
                nodes,
                ..Inner::default()
            }),
            changed: watch::channel(0).0,
            filter_name: filter_name.to_owned(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere leaves node bookkeeping usable: keep serving.
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that instance `key` changed: marks it for the store, updates the
    /// tallies by what it adds now, wakes the waiters.
    fn touch(&self, inner: &mut Inner, key: &str) {
        inner.dirty.insert(key.to_owned());
        Registry::recount(inner, key);
        inner.generation += 1;
        let g = inner.generation;
        self.changed.send_replace(g);
    }

    /// Replaces what `key` added to the tallies by what it adds now (nothing once
    /// it is gone).
    fn recount(inner: &mut Inner, key: &str) {
        // Indexed like `ResourceType::ALL`, as `tallies` are (see [`slot`]).
        let now = inner
            .effective(key)
            .map(|n| ResourceType::ALL.map(|t| standing(n, t)));
        let before = match &now {
            Some(now) => inner.counted.insert(key.to_owned(), now.clone()),
            None => inner.counted.remove(key),
        };
        for (tally, st) in inner.tallies.iter_mut().zip(before.iter().flatten()) {
            tally.apply(st, -1);
        }
        for (tally, st) in inner.tallies.iter_mut().zip(now.iter().flatten()) {
            tally.apply(st, 1);
        }
    }

    /// The server whose guard asks for `resource_name`, if it is a guard's.
    pub fn guarded_server<'n>(&self, resource_name: &'n str) -> Option<&'n str> {
        resource_name
            .strip_prefix(self.filter_name.as_str())?
            .strip_prefix(".guard.")
            .filter(|s| !s.is_empty())
    }

    /// The instance `id` from `ip` opens a stream (or polls, `transport` `rest`):
    /// found, adopted from a record stored without a peer (or, for a poller, from
    /// the one record all REST pollers of the id shared, `id@rest`), or new.
    /// Returns its key.
    fn attach(
        inner: &mut Inner,
        id: &str,
        ip: &str,
        cluster: &str,
        transport: &str,
        now: i64,
    ) -> String {
        let rest = transport == REST;
        let key = if rest {
            rest_instance_key(id, ip)
        } else {
            instance_key(id, ip)
        };
        if !inner.nodes.contains_key(&key) {
            // A record from a control plane that tracked node ids only (or merged
            // REST pollers): the first instance of that id takes it over.
            let shared_rest = instance_key(id, REST);
            let legacy = |k: &str, peer: Option<&str>| {
                inner
                    .nodes
                    .get(k)
                    .is_some_and(|n| n.peer.as_deref() == peer && !n.connected)
            };
            let old_key = if legacy(id, None) {
                Some(id.to_owned())
            } else if rest && legacy(&shared_rest, Some(REST)) {
                Some(shared_rest)
            } else {
                None
            };
            let node = old_key.and_then(|k| {
                let n = inner.nodes.remove(&k)?;
                Registry::recount(inner, &k);
                inner.removed.insert(k);
                Some(n)
            });
            let node = match node {
                Some(mut n) => {
                    n.instance = key.clone();
                    n.peer = Some(ip.to_owned());
                    n
                }
                None => Node::new(&key, id, ip, cluster, transport, now),
            };
            inner.nodes.insert(key.clone(), node);
        }
        if let Some(node) = inner.nodes.get_mut(&key) {
            node.cluster = cluster.to_owned();
            node.transport = transport.to_owned();
        }
        key
    }

    /// Handles one request on `stream`: updates the node, and returns what it meant
    /// and whether the node must now be sent the current version of its type.
    pub fn handle(
        &self,
        stream: &mut Stream,
        req: &Request,
        transport: &str,
        current: &Snapshot,
    ) -> Result<(Event, Option<ResourceType>), ProtocolError> {
        let now = now_ms();
        let mut inner = self.lock();
        let id = match (&stream.key, &req.node) {
            (Some(key), _) => key.clone(),
            (None, Some((id, _))) if id.is_empty() => return Err(ProtocolError::EmptyNodeId),
            (None, Some((id, cluster))) if id.len().max(cluster.len()) > MAX_NODE_NAME => {
                let (what, len) = if id.len() > MAX_NODE_NAME {
                    ("id", id.len())
                } else {
                    ("cluster", cluster.len())
                };
                return Err(ProtocolError::NodeNameTooLong { what, len });
            }
            (None, Some((id, cluster))) => {
                let ip = stream
                    .peer
                    .map(|p| p.ip().to_string())
                    .unwrap_or_else(|| "unknown".into());
                let key = Registry::attach(&mut inner, id, &ip, cluster, transport, now);
                if let Some(node) = inner.nodes.get_mut(&key) {
                    node.streams += 1;
                    if let Some(p) = stream.peer {
                        node.streams_from.push(p.to_string());
                    }
                    if !node.connected {
                        node.connected = true;
                        node.connected_since = Some(now);
                    }
                }
                stream.node = Some(id.clone());
                stream.key = Some(key.clone());
                key
            }
            (None, None) => return Err(ProtocolError::NoNode),
        };
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            // The first request may have connected the instance.
            self.touch(&mut inner, &id);
            return Ok((Event::UnknownType, None));
        };
        let remote = remote_floor(&inner, &id, t);
        let st = stream.types.entry(t).or_default();
        let Some(node) = inner.nodes.get_mut(&id) else {
            return Ok((Event::Stale, None));
        };
        node.last_seen = now;
        if req.response_nonce.is_empty()
            && t == ResourceType::Ecds
            && let Some(server) = req
                .resource_names
                .iter()
                .find_map(|n| self.guarded_server(n))
        {
            node.role = Role::Guard(server.to_owned());
        }
        let state = node.types.entry(t).or_default();
        let event = if req.response_nonce.is_empty() {
            st.subscribed = true;
            st.names = req.resource_names.clone();
            st.fresh = req.version_info.is_empty();
            if !req.version_info.is_empty() {
                st.version = Some(req.version_info.clone());
                state.record.acked_version = Some(req.version_info.clone());
                state.record.acked_at = Some(now);
            }
            Event::Subscribe {
                version: req.version_info.clone(),
            }
        } else if st.nonce.as_deref() != Some(req.response_nonce.as_str()) {
            Event::Stale
        } else {
            st.names = req.resource_names.clone();
            let sent = st.version.clone().unwrap_or_default();
            state.pending_version = None;
            match &req.error_detail {
                Some(error) => {
                    st.fresh = false;
                    state.record.nacked_version = Some(sent.clone());
                    state.record.nack_error = Some(error.clone());
                    state.record.nacked_at = Some(now);
                    Event::Nack {
                        version: sent,
                        running: req.version_info.clone(),
                        error: error.clone(),
                    }
                }
                None => {
                    state.record.acked_version = Some(req.version_info.clone());
                    state.record.acked_at = Some(now);
                    Event::Ack {
                        version: req.version_info.clone(),
                    }
                }
            }
        };
        let due = is_due(t, st, state, remote, &current.get(t).version);
        if !matches!(event, Event::Stale) {
            self.touch(&mut inner, &id);
        }
        Ok((event, due.then_some(t)))
    }

    /// The types `stream`'s node must be sent now that `current` is served.
    pub fn due(&self, stream: &Stream, current: &Snapshot) -> Vec<ResourceType> {
        let Some(id) = &stream.key else {
            return Vec::new();
        };
        let inner = self.lock();
        let Some(node) = inner.nodes.get(id) else {
            return Vec::new();
        };
        ResourceType::ALL
            .into_iter()
            .filter(|t| {
                let (Some(st), Some(state)) = (stream.types.get(t), node.types.get(t)) else {
                    return false;
                };
                let remote = remote_floor(&inner, id, *t);
                is_due(*t, st, state, remote, &current.get(*t).version)
            })
            .collect()
    }

    /// Records that `version` of type `t` went out on `stream` with `nonce`.
    pub fn sent(&self, stream: &mut Stream, t: ResourceType, version: &str, nonce: &str) {
        let st = stream.types.entry(t).or_default();
        st.version = Some(version.to_owned());
        st.nonce = Some(nonce.to_owned());
        let Some(id) = &stream.key else { return };
        let mut inner = self.lock();
        if let Some(node) = inner.nodes.get_mut(id) {
            node.types.entry(t).or_default().pending_version = Some(version.to_owned());
            let id = id.clone();
            self.touch(&mut inner, &id);
        }
    }

    /// The stream ended: the node is disconnected once its last stream is.
    pub fn close(&self, stream: &Stream) {
        let Some(id) = &stream.key else { return };
        let mut inner = self.lock();
        if let Some(node) = inner.nodes.get_mut(id) {
            node.streams = node.streams.saturating_sub(1);
            if let Some(p) = stream.peer {
                let p = p.to_string();
                if let Some(i) = node.streams_from.iter().position(|s| *s == p) {
                    node.streams_from.remove(i);
                }
            }
            if node.streams == 0 {
                node.connected = false;
                node.connected_since = None;
                for s in node.types.values_mut() {
                    s.pending_version = None;
                }
            }
            node.last_seen = now_ms();
            let id = id.clone();
            self.touch(&mut inner, &id);
        }
    }

    /// One REST-JSON poll (see [`RestPoll`]): the poller is the instance of its node
    /// id at its peer address, connected until it is silent for the expiry. A poll
    /// after a response that does not report its version is that response's NACK
    /// (REST carries no nonce to answer). True when `current` must be sent.
    pub fn rest_poll(&self, poll: &RestPoll<'_>, current: &str) -> bool {
        let now = now_ms();
        let mut inner = self.lock();
        let ip = poll
            .peer
            .map(|p| p.ip().to_string())
            .unwrap_or_else(|| "unknown".into());
        let key = Registry::attach(&mut inner, poll.id, &ip, poll.cluster, REST, now);
        let guarded = (poll.t == ResourceType::Ecds)
            .then(|| poll.names.iter().find_map(|n| self.guarded_server(n)))
            .flatten();
        let remote = remote_floor(&inner, &key, poll.t);
        let Some(node) = inner.nodes.get_mut(&key) else {
            return false;
        };
        node.connected = true;
        node.connected_since.get_or_insert(now);
        node.last_seen = now;
        node.streams_from = poll.peer.iter().map(ToString::to_string).collect();
        if let Some(server) = guarded {
            node.role = Role::Guard(server.to_owned());
        }
        let running = poll.running;
        let state = node.types.entry(poll.t).or_default();
        if !running.is_empty() {
            state.record.acked_version = Some(running.to_owned());
            state.record.acked_at = Some(now);
        }
        if let Some(sent) = state.pending_version.take()
            && sent != running
        {
            state.record.nacked_version = Some(sent);
            state.record.nack_error = Some(
                poll.error
                    .map(str::to_owned)
                    .unwrap_or_else(|| "not applied (REST xDS gives no detail)".into()),
            );
            state.record.nacked_at = Some(now);
        }
        let nacked_here =
            state.record.nacked_version.as_deref() == Some(current) && !running.is_empty();
        // As for streams (`is_due`): never a map older than the newest one the poller
        // is known to run, here or (its polls spread over replicas) on another one.
        let older = poll.t == ResourceType::Ecds
            && older_than_known(
                current,
                [Some(running), state.record.acked_version.as_deref()],
                remote,
            );
        let due = running != current && !nacked_here && !older;
        if due {
            state.pending_version = Some(current.to_owned());
        }
        self.touch(&mut inner, &key);
        due
    }

    /// REST pollers silent here for longer than `after` are marked disconnected (and
    /// kept: a poller cut off may still serve with the map it has).
    pub fn expire_pollers(&self, after: Duration) {
        let cutoff = now_ms() - after.as_millis() as i64;
        let mut inner = self.lock();
        let stale: Vec<String> = inner
            .nodes
            .values()
            .filter(|n| n.transport == REST && n.connected && n.last_seen < cutoff)
            .map(|n| n.instance.clone())
            .collect();
        for id in stale {
            if let Some(n) = inner.nodes.get_mut(&id) {
                n.connected = false;
                n.connected_since = None;
                n.streams_from.clear();
                for s in n.types.values_mut() {
                    s.pending_version = None;
                }
            }
            self.touch(&mut inner, &id);
        }
    }

    /// Every instance, sorted by instance key.
    pub fn nodes(&self) -> Vec<Node> {
        self.lock().view().cloned().collect()
    }

    /// One instance, by instance key; or by node id, the connected instance first.
    pub fn node(&self, key_or_id: &str) -> Option<Node> {
        let inner = self.lock();
        if let Some(n) = inner.effective(key_or_id) {
            return Some(n.clone());
        }
        let mut of_id: Vec<&Node> = inner.view().filter(|n| n.id == key_or_id).collect();
        of_id.sort_by_key(|n| !n.connected);
        of_id.first().map(|n| (*n).clone())
    }

    /// Forgets the disconnected instances of a node id (or the one instance with this
    /// key); returns the keys forgotten (none when unknown or still connected).
    pub fn forget(&self, key_or_id: &str) -> Vec<String> {
        let mut inner = self.lock();
        let keys: Vec<String> = inner
            .nodes
            .values()
            .filter(|n| !n.connected && (n.instance == key_or_id || n.id == key_or_id))
            .map(|n| n.instance.clone())
            .collect();
        for k in &keys {
            inner.nodes.remove(k);
            inner.dirty.remove(k);
            inner.removed.insert(k.clone());
            Registry::recount(&mut inner, k);
        }
        if !keys.is_empty() {
            inner.generation += 1;
            let g = inner.generation;
            self.changed.send_replace(g);
        }
        keys
    }

    /// The instances changed since the last call, as store records, and the keys of
    /// the instances to delete from the store.
    pub fn take_dirty(&self) -> (Vec<NodeRecord>, Vec<String>) {
        let mut inner = self.lock();
        let dirty = std::mem::take(&mut inner.dirty);
        let removed = std::mem::take(&mut inner.removed);
        let changed = dirty
            .iter()
            .filter_map(|k| inner.nodes.get(k).map(Node::record))
            .collect();
        (changed, removed.into_iter().collect())
    }

    /// Every node id held by more than one Envoy: two instances (from two addresses,
    /// connected or not: a disconnected one may still serve), or two live streams of
    /// one instance.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let inner = self.lock();
        let mut by_id: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
        for n in inner.view() {
            by_id.entry(n.id.as_str()).or_default().push(n);
        }
        by_id
            .into_iter()
            .filter(|(_, ns)| {
                ns.len() > 1
                    || ns
                        .iter()
                        .any(|n| n.streams > 1 || inner.doubly_connected(&n.instance))
            })
            .map(|(id, ns)| Conflict {
                id: id.to_owned(),
                instances: ns
                    .iter()
                    .map(|n| ConflictPeer {
                        instance: n.instance.clone(),
                        connected: n.connected,
                        streams_from: n.streams_from.clone(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Where the connected nodes stand on `version` of type `t`.
    pub fn convergence(&self, t: ResourceType, version: &str) -> Convergence {
        let inner = self.lock();
        let mut c = Convergence {
            version: version.to_owned(),
            ..Convergence::default()
        };
        for n in inner.view().filter(|n| n.connected) {
            if n.acked(t) == Some(version) {
                c.acked.push(n.instance.clone());
            } else if n.nacked(t) == Some(version) {
                let error = n
                    .types
                    .get(&t)
                    .and_then(|s| s.record.nack_error.clone())
                    .unwrap_or_default();
                c.nacked.push((n.instance.clone(), error));
            } else {
                c.pending.push(n.instance.clone());
            }
        }
        c
    }

    /// `(acked, nacked, connected)`: how many connected instances ACKed and NACKed
    /// `version` of `t`, out of how many. O(1): the tallies are kept at every change.
    pub fn tally(&self, t: ResourceType, version: &str) -> (usize, usize, usize) {
        self.lock().tallies[slot(t)].of(version)
    }

    /// Waits until every connected node ACKed `version` of `t`, one NACKed it, or
    /// `timeout` passed; returns where they stand then. Each change costs O(1)
    /// (the tallies); the lists are built once, at the end.
    pub async fn wait_converged(
        &self,
        t: ResourceType,
        version: &str,
        timeout: Duration,
    ) -> Convergence {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let (acked, nacked, connected) = self.tally(t, version);
            if acked == connected || nacked > 0 {
                return self.convergence(t, version);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.convergence(t, version);
            }
        }
    }

    /// Replaces what the other replicas hold (their records in the store); the
    /// tallies follow every instance whose standing record changed.
    pub fn set_remote(&self, records: &[RemoteNode]) {
        let mut remote: BTreeMap<String, Node> = BTreeMap::new();
        for r in records {
            let n = Node::from_remote(r);
            match remote.get(&n.instance) {
                Some(old) if old.stands_over(&n) => {}
                _ => {
                    remote.insert(n.instance.clone(), n);
                }
            }
        }
        let mut inner = self.lock();
        let old = std::mem::replace(&mut inner.remote, remote);
        let keys: std::collections::BTreeSet<String> = old
            .keys()
            .chain(inner.remote.keys())
            .filter(|k| old.get(*k) != inner.remote.get(*k))
            .cloned()
            .collect();
        if keys.is_empty() {
            return;
        }
        for k in &keys {
            Registry::recount(&mut inner, k);
        }
        inner.generation += 1;
        let g = inner.generation;
        self.changed.send_replace(g);
    }

    /// A receiver that changes whenever any node does.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The map version another replica recorded instance `key` ACKing for type `t`.
fn remote_floor(inner: &Inner, key: &str, t: ResourceType) -> Option<u64> {
    ecds_map_version(inner.remote.get(key)?.acked(t)?)
}

/// Whether ECDS version `current` is older than the newest map an Envoy is known to
/// run: what it reports or was last sent, what it ACKed, or (`remote`) what another
/// replica recorded it running. A map version never goes back: such a version is
/// never sent. One served that is not a version of ours never goes over a known map.
fn older_than_known(current: &str, known: [Option<&str>; 2], remote: Option<u64>) -> bool {
    let floor = known
        .into_iter()
        .flatten()
        .filter_map(ecds_map_version)
        .chain(remote)
        .max();
    match (floor, ecds_map_version(current)) {
        (Some(floor), Some(current)) => current < floor,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Whether a stream's node must be sent `current` of type `t`: it does not run it,
/// did not NACK exactly that content, and (filter configurations) `current` is no
/// older a map than the newest one the node is known to run: what it reported or
/// was sent on this stream, what this replica recorded it ACKing (an earlier
/// process of it included), and `remote`, what another replica recorded. A map
/// version never goes back (DESIGN): a replica that is behind sends nothing and
/// sends the map once it catches up. A reported version that is not one of ours
/// ([`ecds_map_version`] reads none) sets no floor; the filter still refuses an
/// older map.
fn is_due(
    t: ResourceType,
    st: &StreamType,
    state: &TypeState,
    remote: Option<u64>,
    current: &str,
) -> bool {
    let nacked_here = state.record.nacked_version.as_deref() == Some(current) && !st.fresh;
    let older = t == ResourceType::Ecds
        && older_than_known(
            current,
            [st.version.as_deref(), state.record.acked_version.as_deref()],
            remote,
        );
    st.subscribed && st.version.as_deref() != Some(current) && !nacked_here && !older
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::snapshot;
    use crate::resources::{CDS_TYPE_URL, ECDS_TYPE_URL};
    use std::sync::Arc;

    fn req(version: &str, nonce: &str, error: Option<&str>) -> Request {
        Request {
            node: Some(("edge-1".into(), "edge".into())),
            type_url: ECDS_TYPE_URL.into(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            resource_names: vec!["seashard.base_router".into()],
            error_detail: error.map(str::to_owned),
        }
    }

    /// Plays a recorded exchange: each request, then whatever the server sends.
    /// Returns the events and the versions sent, in order.
    fn play(
        reg: &Registry,
        stream: &mut Stream,
        snap: &Snapshot,
        reqs: &[Request],
        nonce: &mut u32,
    ) -> (Vec<Event>, Vec<String>) {
        let mut events = Vec::new();
        let mut sent = Vec::new();
        for r in reqs {
            let (e, due) = reg.handle(stream, r, "grpc", snap).unwrap();
            events.push(e);
            if let Some(t) = due {
                *nonce += 1;
                let v = snap.get(t).version.clone();
                reg.sent(stream, t, &v, &nonce.to_string());
                sent.push(v);
            }
        }
        (events, sent)
    }

    #[test]
    fn fresh_envoy_subscribes_gets_the_version_and_acks() {
        let reg = Registry::default();
        let snap = snapshot(3, "/a.wasm");
        let v = snap.ecds.version.clone();
        let mut s = Stream::default();
        let mut n = 0;
        let (events, sent) = play(
            &reg,
            &mut s,
            &snap,
            &[req("", "", None), req(&v, "1", None)],
            &mut n,
        );
        assert_eq!(
            events,
            [
                Event::Subscribe { version: "".into() },
                Event::Ack { version: v.clone() }
            ]
        );
        assert_eq!(sent, std::slice::from_ref(&v));
        let node = reg.node("edge-1").unwrap();
        assert!(node.connected);
        assert_eq!(node.cluster, "edge");
        assert_eq!(node.acked(ResourceType::Ecds), Some(v.as_str()));
        assert!(reg.convergence(ResourceType::Ecds, &v).complete());
        assert!(reg.due(&s, &snap).is_empty());
    }

    #[test]
    fn nack_is_recorded_and_the_same_content_never_resent() {
        let reg = Registry::default();
        let good = snapshot(3, "/a.wasm");
        let bad = snapshot(4, "/missing.wasm");
        let (vg, vb) = (good.ecds.version.clone(), bad.ecds.version.clone());
        let mut s = Stream::default();
        let mut n = 0;
        play(
            &reg,
            &mut s,
            &good,
            &[req("", "", None), req(&vg, "1", None)],
            &mut n,
        );
        // The bad version is pushed: sent once, NACKed, then never again.
        assert_eq!(reg.due(&s, &bad), [ResourceType::Ecds]);
        n += 1;
        reg.sent(&mut s, ResourceType::Ecds, &vb, &n.to_string());
        let (events, sent) = play(
            &reg,
            &mut s,
            &bad,
            &[req(&vg, "2", Some("Failed to load WASM code"))],
            &mut n,
        );
        assert_eq!(
            events,
            [Event::Nack {
                version: vb.clone(),
                running: vg.clone(),
                error: "Failed to load WASM code".into()
            }]
        );
        assert!(sent.is_empty());
        assert!(reg.due(&s, &bad).is_empty());
        let node = reg.node("edge-1").unwrap();
        assert_eq!(node.acked(ResourceType::Ecds), Some(vg.as_str()));
        assert_eq!(node.nacked(ResourceType::Ecds), Some(vb.as_str()));
        let c = reg.convergence(ResourceType::Ecds, &vb);
        assert_eq!(c.nacked.len(), 1);
        assert!(!c.complete());

        // The Envoy reconnects (a control plane restart) still running the good one:
        // the NACKed content is not offered again.
        reg.close(&s);
        let mut s2 = Stream::default();
        let (_, sent) = play(&reg, &mut s2, &bad, &[req(&vg, "", None)], &mut n);
        assert!(sent.is_empty());
        // A new version is sent.
        let newer = snapshot(5, "/a.wasm");
        assert_eq!(reg.due(&s2, &newer), [ResourceType::Ecds]);
    }

    #[test]
    fn a_fresh_envoy_process_is_offered_what_an_earlier_process_nacked() {
        let reg = Registry::default();
        let bad = snapshot(4, "/missing.wasm");
        let vb = bad.ecds.version.clone();
        let mut s = Stream::default();
        let mut n = 0;
        let (_, sent) = play(
            &reg,
            &mut s,
            &bad,
            &[req("", "", None), req("", "1", Some("no"))],
            &mut n,
        );
        assert_eq!(sent, std::slice::from_ref(&vb));
        reg.close(&s);
        // Same node id, new process (empty version_info): it never saw the content.
        let mut s2 = Stream::default();
        let (_, sent) = play(&reg, &mut s2, &bad, &[req("", "", None)], &mut n);
        assert_eq!(sent, [vb]);
    }

    #[test]
    fn stale_nonces_are_ignored_and_reconnects_at_current_need_nothing() {
        let reg = Registry::default();
        let a = snapshot(3, "/a.wasm");
        let b = snapshot(4, "/a.wasm");
        let (va, vb) = (a.ecds.version.clone(), b.ecds.version.clone());
        let mut s = Stream::default();
        let mut n = 0;
        play(&reg, &mut s, &a, &[req("", "", None)], &mut n); // nonce 1 = va
        n += 1;
        reg.sent(&mut s, ResourceType::Ecds, &vb, &n.to_string()); // nonce 2 = vb
        let (events, _) = play(
            &reg,
            &mut s,
            &b,
            &[req(&va, "1", None), req(&vb, "2", None)],
            &mut n,
        );
        assert_eq!(events[0], Event::Stale);
        assert_eq!(
            events[1],
            Event::Ack {
                version: vb.clone()
            }
        );
        reg.close(&s);
        assert!(!reg.node("edge-1").unwrap().connected);
        let mut s2 = Stream::default();
        let (events, sent) = play(&reg, &mut s2, &b, &[req(&vb, "", None)], &mut n);
        assert_eq!(
            events,
            [Event::Subscribe {
                version: vb.clone()
            }]
        );
        assert!(sent.is_empty());
        assert!(reg.node("edge-1").unwrap().connected);
    }

    #[test]
    fn cds_and_ecds_are_tracked_apart_and_unknown_types_ignored() {
        let reg = Registry::default();
        let snap = snapshot(1, "/a.wasm");
        let mut s = Stream::default();
        let mut n = 0;
        let cds = Request {
            type_url: CDS_TYPE_URL.into(),
            resource_names: vec![],
            ..req("", "", None)
        };
        let lds = Request {
            type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
            ..req("", "", None)
        };
        let (events, sent) = play(&reg, &mut s, &snap, &[cds, lds], &mut n);
        assert_eq!(events[1], Event::UnknownType);
        assert_eq!(sent, std::slice::from_ref(&snap.cds.version));
        let node = reg.node("edge-1").unwrap();
        assert_eq!(node.types.len(), 1);
        assert_eq!(
            node.types[&ResourceType::Cds].pending_version.as_deref(),
            Some(snap.cds.version.as_str())
        );
    }

    #[test]
    fn first_request_must_name_the_node() {
        let reg = Registry::default();
        let snap = snapshot(1, "/a.wasm");
        let mut s = Stream::default();
        let r = Request {
            node: None,
            ..req("", "", None)
        };
        assert_eq!(
            reg.handle(&mut s, &r, "grpc", &snap).unwrap_err(),
            ProtocolError::NoNode
        );
    }

    #[tokio::test]
    async fn waiters_see_acks_and_nacks() {
        let reg = Arc::new(Registry::default());
        let snap = snapshot(1, "/a.wasm");
        let v = snap.ecds.version.clone();
        let mut s = Stream::default();
        let mut n = 0;
        play(&reg, &mut s, &snap, &[req("", "", None)], &mut n);
        let waiter = {
            let reg = reg.clone();
            let v = v.clone();
            tokio::spawn(async move {
                reg.wait_converged(ResourceType::Ecds, &v, Duration::from_secs(5))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        play(&reg, &mut s, &snap, &[req(&v, "1", None)], &mut n);
        let c = waiter.await.unwrap();
        assert!(c.complete(), "{c:?}");
        // Nobody acks a version that was never sent: times out, pending.
        let c = reg
            .wait_converged(ResourceType::Ecds, "9-x", Duration::from_millis(50))
            .await;
        assert_eq!(c.pending, ["edge-1@unknown"]);
    }

    fn from(ip: &str, port: u16) -> Stream {
        Stream::new(Some(SocketAddr::new(ip.parse().unwrap(), port)))
    }

    #[test]
    fn one_id_from_two_addresses_is_two_instances_and_a_conflict_until_forgotten() {
        let reg = Registry::default();
        let snap = snapshot(1, "/a.wasm");
        let mut n = 0;
        let mut a = from("10.0.0.1", 4000);
        let mut b = from("10.0.0.2", 4000);
        play(&reg, &mut a, &snap, &[req("", "", None)], &mut n);
        assert!(reg.conflicts().is_empty());
        play(&reg, &mut b, &snap, &[req("", "", None)], &mut n);
        let keys: Vec<String> = reg.nodes().into_iter().map(|n| n.instance).collect();
        assert_eq!(keys, ["edge-1@10.0.0.1", "edge-1@10.0.0.2"]);
        let c = reg.conflicts();
        assert_eq!(c.len(), 1);
        assert!(
            c[0].to_string()
                .contains("edge-1@10.0.0.2 (connected, streams from 10.0.0.2:4000)")
        );
        // One ACK stands for one instance only.
        let v = snap.ecds.version.clone();
        play(&reg, &mut a, &snap, &[req(&v, "1", None)], &mut n);
        let conv = reg.convergence(ResourceType::Ecds, &v);
        assert_eq!(conv.acked, ["edge-1@10.0.0.1"]);
        assert_eq!(conv.pending, ["edge-1@10.0.0.2"]);
        // b's link dies: it may still serve, so the conflict stays.
        reg.close(&b);
        let c = reg.conflicts();
        assert!(
            c[0].to_string().contains("edge-1@10.0.0.2 (disconnected)"),
            "{}",
            c[0]
        );
        assert!(
            reg.forget("edge-1@10.0.0.1").is_empty(),
            "a connected one is kept"
        );
        assert_eq!(reg.forget("edge-1"), ["edge-1@10.0.0.2"]);
        assert!(reg.conflicts().is_empty());
        assert_eq!(reg.take_dirty().1, ["edge-1@10.0.0.2"]);
    }

    #[test]
    fn a_reconnect_from_the_same_address_is_the_same_instance_and_two_live_streams_conflict() {
        let reg = Registry::default();
        let snap = snapshot(1, "/a.wasm");
        let mut n = 0;
        let mut old = from("10.0.0.1", 4000);
        play(&reg, &mut old, &snap, &[req("", "", None)], &mut n);
        // The old stream is half-open while the Envoy reconnects: two live streams.
        let mut new = from("10.0.0.1", 4001);
        play(&reg, &mut new, &snap, &[req("", "", None)], &mut n);
        assert_eq!(reg.nodes().len(), 1);
        assert_eq!(reg.conflicts().len(), 1);
        // Keepalive finds the old one dead: one instance, no conflict.
        reg.close(&old);
        assert!(reg.conflicts().is_empty());
        let node = reg.node("edge-1").unwrap();
        assert!(node.connected);
        assert_eq!(node.streams_from, ["10.0.0.1:4001"]);
    }

    #[test]
    fn a_record_stored_before_instances_is_adopted_and_guards_are_known_by_their_resource() {
        let legacy = NodeRecord {
            id: "edge-1".into(),
            node_id: "edge-1".into(),
            peer: None,
            role: "edge".into(),
            cluster: "edge".into(),
            first_seen: 1,
            connected_since: None,
            last_seen: 1,
            transport: "grpc".into(),
            types: vec![],
        };
        let reg = Registry::new(vec![legacy], "seashard.base_router");
        let snap = snapshot(1, "/a.wasm");
        let mut n = 0;
        let mut s = from("10.0.0.1", 4000);
        play(&reg, &mut s, &snap, &[req("", "", None)], &mut n);
        let keys: Vec<String> = reg.nodes().into_iter().map(|n| n.instance).collect();
        assert_eq!(keys, ["edge-1@10.0.0.1"]);
        assert_eq!(reg.nodes()[0].first_seen, 1);
        assert_eq!(reg.take_dirty().1, ["edge-1"]);
        assert!(reg.conflicts().is_empty());

        let mut g = from("10.0.0.9", 4000);
        let guard = Request {
            node: Some(("guard-a".into(), "guards".into())),
            resource_names: vec!["seashard.base_router.guard.dtable-server".into()],
            ..req("", "", None)
        };
        play(&reg, &mut g, &snap, &[guard], &mut n);
        let node = reg.node("guard-a").unwrap();
        assert_eq!(node.role, Role::Guard("dtable-server".into()));
        assert_eq!(reg.guarded_server("seashard.base_router.guard."), None);
        assert_eq!(reg.guarded_server("other.guard.x"), None);
    }

    #[test]
    fn the_tallies_always_equal_a_full_count() {
        // Random streams of subscribes, ACKs, NACKs, reconnects and forgets over a few
        // instances and versions; after each step the O(1) tallies must equal a walk
        // over every node.
        let reg = Registry::default();
        let snaps: Vec<Arc<Snapshot>> = (1..=3).map(|v| snapshot(v, "/a.wasm")).collect();
        let mut streams: Vec<Option<Stream>> = (0..6).map(|_| None).collect();
        let mut random = seashard_tests::xorshift(0x9e37_79b9_7f4a_7c15);
        let mut next = move |n: u64| random() % n;
        let mut nonce = 0u32;
        for _ in 0..3000 {
            let i = next(6) as usize;
            let snap = &snaps[next(3) as usize];
            let id = format!("edge-{}", i % 4);
            let ip = format!("10.0.0.{}", i % 3);
            let v = snap.ecds.version.clone();
            match next(6) {
                5 => {
                    // Another replica's view changes: some of the same instances,
                    // connected or not, its replica alive or not.
                    let records: Vec<RemoteNode> = (0..next(4))
                        .map(|k| {
                            let acked = snaps[next(3) as usize].ecds.version.clone();
                            remote(
                                &format!("edge-{}", (i + k as usize) % 4),
                                &format!("10.0.0.{}", next(3)),
                                next(2) == 0,
                                next(3) != 0,
                                Some(&acked),
                            )
                        })
                        .collect();
                    reg.set_remote(&records);
                }
                0 => {
                    if let Some(s) = streams[i].take() {
                        reg.close(&s);
                    }
                    let mut s = from(&ip, 4000 + i as u16);
                    let r = Request {
                        node: Some((id.clone(), "c".into())),
                        ..req("", "", None)
                    };
                    play(&reg, &mut s, snap, &[r], &mut nonce);
                    streams[i] = Some(s);
                }
                1 | 2 => {
                    if let Some(s) = streams[i].as_mut() {
                        nonce += 1;
                        reg.sent(s, ResourceType::Ecds, &v, &nonce.to_string());
                        let error = (next(3) == 0).then_some("no");
                        let r = req(&v, &nonce.to_string(), error);
                        play(&reg, s, snap, &[r], &mut nonce);
                    }
                }
                3 => {
                    if let Some(s) = streams[i].take() {
                        reg.close(&s);
                    }
                }
                _ => {
                    reg.forget(&id);
                }
            }
            for snap in &snaps {
                let v = &snap.ecds.version;
                let c = reg.convergence(ResourceType::Ecds, v);
                let (acked, nacked, connected) = reg.tally(ResourceType::Ecds, v);
                assert_eq!(
                    (acked, nacked, connected),
                    (
                        c.acked.len(),
                        c.nacked.len(),
                        c.acked.len() + c.nacked.len() + c.pending.len()
                    ),
                    "{c:?}"
                );
            }
        }
    }

    /// Opens a stream of `edge-1` from 10.0.0.1 reporting `version`; what it is sent.
    fn subscribe(reg: &Registry, snap: &Snapshot, version: &str) -> (Stream, Vec<String>) {
        let mut s = from("10.0.0.1", 1);
        let (_, sent) = play(reg, &mut s, snap, &[req(version, "", None)], &mut 0);
        (s, sent)
    }

    #[test]
    fn is_due_never_picks_a_map_older_than_the_node_reports() {
        let reg = Registry::default();
        let (v7, v8, v9) = (
            snapshot(7, "/a.wasm"),
            snapshot(8, "/a.wasm"),
            snapshot(9, "/a.wasm"),
        );
        // The Envoy runs 8; this replica serves 7: nothing is sent.
        let (mut s, sent) = subscribe(&reg, &v7, &v8.ecds.version);
        assert!(sent.is_empty(), "sent {sent:?} to an Envoy running 8");
        assert!(reg.due(&s, &v7).is_empty());
        // Once the replica serves 9, it is sent; never 7 again, even after a NACK of 9.
        assert_eq!(reg.due(&s, &v9), vec![ResourceType::Ecds]);
        let (_, sent) = play(&reg, &mut s, &v9, &[], &mut 0);
        assert!(sent.is_empty());
        reg.sent(&mut s, ResourceType::Ecds, &v9.ecds.version, "n9");
        let nack = req(&v8.ecds.version, "n9", Some("refused"));
        let (_, due) = reg.handle(&mut s, &nack, "grpc", &v9).unwrap();
        assert_eq!(due, None);
        assert!(reg.due(&s, &v7).is_empty());
        // The same map under other filter settings is not older: it is sent.
        let (_, sent) = subscribe(
            &Registry::default(),
            &snapshot(8, "/b.wasm"),
            &v8.ecds.version,
        );
        assert_eq!(sent, [snapshot(8, "/b.wasm").ecds.version.clone()]);
        // Clusters carry no map: their versions are not ordered.
        let mut c = from("10.0.0.1", 2);
        let cds = Request {
            type_url: CDS_TYPE_URL.into(),
            version_info: "ffffffffffffffff".into(),
            ..req("", "", None)
        };
        let (_, due) = Registry::default()
            .handle(&mut c, &cds, "grpc", &v7)
            .unwrap();
        assert_eq!(due, Some(ResourceType::Cds));
    }

    #[test]
    fn is_due_never_picks_a_map_older_than_recorded_here_or_on_another_replica() {
        let (v7, v8) = (snapshot(7, "/a.wasm"), snapshot(8, "/a.wasm"));
        // Recorded here (an earlier process of this Envoy ACKed 8): a fresh process
        // of it is not handed 7 by this replica, which is behind.
        let reg = Registry::default();
        let (s, _) = subscribe(&reg, &v8, &v8.ecds.version);
        reg.close(&s);
        let (s, sent) = subscribe(&reg, &v7, "");
        assert!(sent.is_empty(), "sent {sent:?}");
        assert!(reg.due(&s, &v7).is_empty());
        assert_eq!(reg.due(&s, &v8), vec![ResourceType::Ecds]);
        // Stored records count as well (a restarted replica).
        let (records, _) = reg.take_dirty();
        let restarted = Registry::new(records, "seashard.base_router");
        let (_, sent) = subscribe(&restarted, &v7, "");
        assert!(sent.is_empty(), "sent {sent:?}");
        // Recorded by another replica: the Envoy ACKed 8 there.
        let reg = Registry::default();
        reg.set_remote(&[remote(
            "edge-1",
            "10.0.0.1",
            false,
            false,
            Some(&v8.ecds.version),
        )]);
        let (s, sent) = subscribe(&reg, &v7, "");
        assert!(sent.is_empty(), "sent {sent:?}");
        assert!(reg.due(&s, &v7).is_empty());
        // Another instance's record is no floor for this one.
        let reg = Registry::default();
        reg.set_remote(&[remote(
            "edge-1",
            "10.0.0.9",
            true,
            true,
            Some(&v8.ecds.version),
        )]);
        let (_, sent) = subscribe(&reg, &v7, "");
        assert_eq!(sent, std::slice::from_ref(&v7.ecds.version));
    }

    #[test]
    fn an_unreadable_reported_version_sets_no_floor_and_an_old_form_is_read() {
        let v7 = snapshot(7, "/a.wasm");
        for junk in ["not-ours", "x", "99999999999999999999999-1"] {
            let (_, sent) = subscribe(&Registry::default(), &v7, junk);
            assert_eq!(sent, std::slice::from_ref(&v7.ecds.version), "{junk}");
        }
        // An older seashard's unpadded form is a floor like any.
        let (_, sent) = subscribe(&Registry::default(), &v7, "8-0a1b2c3d");
        assert!(sent.is_empty());
        let (_, sent) = subscribe(&Registry::default(), &v7, "6-0a1b2c3d");
        assert_eq!(sent, std::slice::from_ref(&v7.ecds.version));
    }

    fn remote(id: &str, ip: &str, connected: bool, live: bool, acked: Option<&str>) -> RemoteNode {
        RemoteNode {
            replica: "other".into(),
            live,
            record: NodeRecord {
                id: instance_key(id, ip),
                node_id: id.into(),
                peer: Some(ip.into()),
                role: "edge".into(),
                cluster: "c".into(),
                first_seen: 1,
                connected_since: connected.then_some(2),
                last_seen: 3,
                transport: "grpc".into(),
                types: vec![(
                    "ecds".into(),
                    TypeRecord {
                        acked_version: acked.map(str::to_owned),
                        ..TypeRecord::default()
                    },
                )],
            },
        }
    }

    #[test]
    fn other_replicas_envoys_are_waited_for_and_a_dead_replicas_are_not_connected() {
        let reg = Registry::default();
        let snap = snapshot(1, "/a.wasm");
        let v = snap.ecds.version.clone();
        // An Envoy on another replica, not yet ACKed: the version has not converged.
        reg.set_remote(&[remote("edge-b", "10.0.0.2", true, true, None)]);
        assert_eq!(reg.tally(ResourceType::Ecds, &v), (0, 0, 1));
        let n = reg.node("edge-b").unwrap();
        assert!(n.connected && n.replica.as_deref() == Some("other"));
        // It ACKs there.
        reg.set_remote(&[remote("edge-b", "10.0.0.2", true, true, Some(&v))]);
        assert_eq!(reg.tally(ResourceType::Ecds, &v), (1, 0, 1));
        // That replica dies: its Envoy is known, no longer connected.
        reg.set_remote(&[remote("edge-b", "10.0.0.2", true, false, Some(&v))]);
        assert_eq!(reg.tally(ResourceType::Ecds, &v), (0, 0, 0));
        assert!(!reg.node("edge-b@10.0.0.2").unwrap().connected);
        // It reconnects here: this replica's record stands.
        let mut s = from("10.0.0.2", 4000);
        let mut nonce = 0;
        let r = Request {
            node: Some(("edge-b".into(), "c".into())),
            ..req("", "", None)
        };
        play(&reg, &mut s, &snap, &[r], &mut nonce);
        let n = reg.node("edge-b@10.0.0.2").unwrap();
        assert!(n.connected && n.replica.is_none());
        assert!(reg.conflicts().is_empty());
        // The same instance live on two replicas at once: a conflict.
        reg.set_remote(&[remote("edge-b", "10.0.0.2", true, true, Some(&v))]);
        assert_eq!(reg.conflicts().len(), 1, "{:?}", reg.conflicts());
        // Another instance of the id elsewhere: a conflict too, shown once.
        reg.set_remote(&[remote("edge-b", "10.0.0.9", false, true, None)]);
        let c = reg.conflicts();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].instances.len(), 2);
    }

    /// A REST poll of ECDS by `id` from `ip`, running `running`; whether it is sent.
    fn rest(reg: &Registry, id: &str, ip: &str, names: &[&str], running: &str, cur: &str) -> bool {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        reg.rest_poll(
            &RestPoll {
                id,
                cluster: "edge",
                peer: Some(SocketAddr::new(ip.parse().unwrap(), 40000)),
                t: ResourceType::Ecds,
                running,
                error: None,
                names: &names,
            },
            cur,
        )
    }

    const ROUTER: &[&str] = &["seashard.base_router"];

    #[test]
    fn two_rest_pollers_of_one_id_from_two_addresses_are_two_instances_and_a_conflict() {
        let reg = Registry::default();
        let v = snapshot(1, "/a.wasm").ecds.version.clone();
        assert!(rest(&reg, "edge-1", "10.0.0.1", ROUTER, "", &v));
        assert!(reg.conflicts().is_empty());
        assert!(rest(&reg, "edge-1", "10.0.0.2", ROUTER, "", &v));
        let keys: Vec<String> = reg.nodes().into_iter().map(|n| n.instance).collect();
        assert_eq!(keys, ["edge-1@rest:10.0.0.1", "edge-1@rest:10.0.0.2"]);
        let c = reg.conflicts();
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(
            c[0].to_string()
                .contains("edge-1@rest:10.0.0.2 (connected, streams from 10.0.0.2:40000)"),
            "{}",
            c[0]
        );
        // One poller's ACK stands for that poller only.
        assert!(!rest(&reg, "edge-1", "10.0.0.1", ROUTER, &v, &v));
        let conv = reg.convergence(ResourceType::Ecds, &v);
        assert_eq!(conv.acked, ["edge-1@rest:10.0.0.1"]);
        assert_eq!(conv.pending, ["edge-1@rest:10.0.0.2"]);
        // The second one falls silent (cut off): disconnected, kept, still a conflict.
        std::thread::sleep(Duration::from_millis(30));
        assert!(!rest(&reg, "edge-1", "10.0.0.1", ROUTER, &v, &v));
        reg.expire_pollers(Duration::from_millis(20));
        let b = reg.node("edge-1@rest:10.0.0.2").unwrap();
        assert!(!b.connected && b.streams_from.is_empty());
        assert!(reg.node("edge-1@rest:10.0.0.1").unwrap().connected);
        let c = reg.conflicts();
        assert!(
            c[0].to_string()
                .contains("edge-1@rest:10.0.0.2 (disconnected)"),
            "{}",
            c[0]
        );
        assert_eq!(reg.forget("edge-1"), ["edge-1@rest:10.0.0.2"]);
        assert!(reg.conflicts().is_empty());
    }

    #[test]
    fn a_rest_poller_and_a_stream_of_one_id_are_two_instances_even_from_one_address() {
        let reg = Registry::default();
        let snap = snapshot(1, "/a.wasm");
        let mut n = 0;
        let mut s = from("10.0.0.1", 4000);
        play(&reg, &mut s, &snap, &[req("", "", None)], &mut n);
        assert!(reg.conflicts().is_empty());
        rest(&reg, "edge-1", "10.0.0.1", ROUTER, "", &snap.ecds.version);
        let keys: Vec<String> = reg.nodes().into_iter().map(|n| n.instance).collect();
        assert_eq!(keys, ["edge-1@10.0.0.1", "edge-1@rest:10.0.0.1"]);
        assert_eq!(reg.conflicts().len(), 1);
        assert_eq!(reg.node("edge-1@rest:10.0.0.1").unwrap().transport, "rest");
        assert_eq!(reg.node("edge-1@10.0.0.1").unwrap().transport, "grpc");
    }

    #[test]
    fn a_rest_guard_gets_the_guard_role_from_the_resource_it_asks_for() {
        let reg = Registry::new(Vec::new(), "seashard.base_router");
        let v = snapshot(1, "/a.wasm").ecds.version.clone();
        rest(
            &reg,
            "guard-a",
            "10.0.0.9",
            &["seashard.base_router.guard.dtable-server"],
            "",
            &v,
        );
        rest(&reg, "edge-1", "10.0.0.1", ROUTER, "", &v);
        let g = reg.node("guard-a").unwrap();
        assert_eq!(g.role, Role::Guard("dtable-server".into()));
        assert_eq!(g.instance, "guard-a@rest:10.0.0.9");
        assert_eq!(reg.node("edge-1").unwrap().role, Role::Edge);
        // Stored and read back, it is still a guard.
        let (dirty, _) = reg.take_dirty();
        let again = Registry::new(dirty, "seashard.base_router");
        assert_eq!(
            again.node("guard-a@rest:10.0.0.9").unwrap().role,
            Role::Guard("dtable-server".into())
        );
    }

    #[test]
    fn a_rest_poller_spread_over_replicas_is_one_instance_but_another_address_conflicts() {
        let reg = Registry::default();
        let v = snapshot(1, "/a.wasm").ecds.version.clone();
        rest(&reg, "edge-1", "10.0.0.1", ROUTER, &v, &v);
        // Its other polls go to another replica, which records it connected too.
        let mut r = remote("edge-1", "10.0.0.1", true, true, Some(&v));
        r.record.id = rest_instance_key("edge-1", "10.0.0.1");
        r.record.transport = "rest".into();
        reg.set_remote(std::slice::from_ref(&r));
        assert!(reg.conflicts().is_empty(), "{:?}", reg.conflicts());
        assert_eq!(reg.nodes().len(), 1);
        // Another Envoy with that id polls the other replica from elsewhere.
        let mut other = r.clone();
        other.record.id = rest_instance_key("edge-1", "10.0.0.2");
        other.record.peer = Some("10.0.0.2".into());
        other.record.types = vec![];
        reg.set_remote(&[r, other]);
        assert_eq!(reg.conflicts().len(), 1);
        assert_eq!(
            reg.convergence(ResourceType::Ecds, &v).pending,
            ["edge-1@rest:10.0.0.2"]
        );
    }

    #[test]
    fn a_rest_poller_is_never_sent_a_map_older_than_one_it_runs_here_or_elsewhere() {
        let reg = Registry::default();
        let (v4, v5) = (
            snapshot(4, "/a.wasm").ecds.version.clone(),
            snapshot(5, "/a.wasm").ecds.version.clone(),
        );
        // This replica is behind (serves 4); the poller runs 5.
        assert!(!rest(&reg, "edge-1", "10.0.0.1", ROUTER, &v5, &v4));
        // Another poller of an id ACKed 5 on another replica; fresh here: nothing older.
        let mut r = remote("edge-2", "10.0.0.2", true, true, Some(&v5));
        r.record.id = rest_instance_key("edge-2", "10.0.0.2");
        r.record.transport = "rest".into();
        reg.set_remote(&[r]);
        assert!(!rest(&reg, "edge-2", "10.0.0.2", ROUTER, "", &v4));
        // A newer map is sent to both.
        let v6 = snapshot(6, "/a.wasm").ecds.version.clone();
        assert!(rest(&reg, "edge-1", "10.0.0.1", ROUTER, &v5, &v6));
        assert!(rest(&reg, "edge-2", "10.0.0.2", ROUTER, "", &v6));
    }

    #[test]
    fn the_record_all_rest_pollers_of_an_id_shared_is_taken_over_by_the_first_poller() {
        let shared = NodeRecord {
            id: "edge-1@rest".into(),
            node_id: "edge-1".into(),
            peer: Some("rest".into()),
            role: "guard:dtable-server".into(),
            cluster: "edge".into(),
            first_seen: 1,
            connected_since: None,
            last_seen: 1,
            transport: "rest".into(),
            types: vec![],
        };
        let reg = Registry::new(vec![shared], "seashard.base_router");
        let v = snapshot(1, "/a.wasm").ecds.version.clone();
        rest(&reg, "edge-1", "10.0.0.1", ROUTER, "", &v);
        let keys: Vec<String> = reg.nodes().into_iter().map(|n| n.instance).collect();
        assert_eq!(keys, ["edge-1@rest:10.0.0.1"]);
        assert_eq!(reg.nodes()[0].first_seen, 1);
        assert_eq!(reg.take_dirty().1, ["edge-1@rest"]);
        // The next poller from elsewhere is another instance: a conflict.
        rest(&reg, "edge-1", "10.0.0.2", ROUTER, "", &v);
        assert_eq!(reg.conflicts().len(), 1);
    }

    #[test]
    fn records_round_trip_through_the_store_shape() {
        let reg = Registry::default();
        let snap = snapshot(1, "/a.wasm");
        let mut s = Stream::default();
        let mut n = 0;
        play(&reg, &mut s, &snap, &[req("", "", None)], &mut n);
        let (dirty, removed) = reg.take_dirty();
        assert_eq!(dirty.len(), 1);
        assert!(removed.is_empty());
        assert!(reg.take_dirty().0.is_empty());
        let again = Registry::new(dirty, "seashard.base_router");
        let node = again.node("edge-1").unwrap();
        assert!(!node.connected);
        assert_eq!(node.cluster, "edge");
    }
}
