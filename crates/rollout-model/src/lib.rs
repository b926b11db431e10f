//! A model of the rollout protocol as the code runs it, checked with [stateright]
//! (safety, by BFS) and with [`liveness`] (every rollout ends, under fairness).
//!
//! ```text
//!            store (etcd / SQLite): versions 1..=active, rollouts 1 and 2 (step, from,
//!            │      fence, to, servers to restart), may_hold per server, ACK records
//!            │
//!     ┌──────┴───────┐ watch (lags: Adopt)  ┌──────────────┐
//!     │ replica R0   │                      │ replica R1   │  either may lead (Elect),
//!     │ leader:      │                      │ follower,    │  crash (Crash/RestartReplica)
//!     │ drives the   │                      │ maybe cut    │  or be cut off from the store
//!     │ rollout      │                      │ from the     │  (CutFromStore: stale, still
//!     └──┬───────┬───┘                      │ store: stale │  serving its old snapshot)
//!        │ ADS   │ REST poll                └──┬───────┬───┘
//!        ▼       ▼                             ▼       ▼
//!     edges E1, E2 (ADS streams or REST pollers, maybe one node id), failing over
//!     between replicas and reporting the version they run (Subscribe / Poll)
//!        │ request for B (readable, or percent-encoded: RequestEncoded)
//!        ▼
//!     guard G_O ─▶ O        guard G_N ─▶ N        (guards optional)
//!
//!   rollout k:  plan ─▶ fence ─▶ restart ─▶ activate ─▶ finish: done (may_hold updated)
//!                 │        │         │
//!                 └────────┴─────────┴──▶ rolling back ─▶ finish: rolled back
//!   versions:   1: B → O;  each rollout publishes a fence (B fenced, 503) and then
//!               the new map (B → the other server) or a rollback (the old map again)
//!   INVARIANTS: never do O and N both hold B; no proxy ever applies an older version
//!   LIVENESS:   under fairness, every rollout begun ends (done or rolled back)
//! ```
//!
//! **What is modelled**, each action next to the function it stands for
//! ([`Action`]): one base B, two servers, two rollouts in a row (the first moves B
//! from O to N, the second moves it back, each planning its restarts from
//! `may_hold` as `rollout::restart_plan` does and updating it in `rollout::finish`).
//! One or two control plane replicas on one store: one leader drives the rollout
//! (steps of `rollout::advance`), a follower's watch lags (`server::follow_store` /
//! `ControlPlane::adopt`, one version at a time), a replica may be cut off from
//! the store and keep serving its old snapshot to the Envoys that fail over to it.
//! Envoys: two edges (ADS streams or REST pollers, which may share a node id) and
//! optionally a guard in front of each server; streams report the version they run
//! when they open (`Registry::handle`), REST pollers on every poll
//! (`Registry::rest_poll`); a replica sends a version when `is_due` says so
//! (`Registry::due`). ACK records live in the store (they survive a replica crash).
//! The store may fail (a full disk, no etcd majority): the driver's writes fail
//! until it recovers. Requests for B through the edges, also in a percent-encoded
//! form (`Gate::verdict`): an edge that reads no base sends it by a path rule or the
//! default to either server, a guard that reads no base passes it.
//!
//! **What is abstracted away.** Bases do not interact, so one base suffices; a
//! version is "who owns B, or fenced". A wait's timeout, a NACK, a failed hook or an
//! abort is one non-deterministic [`Action::RollBack`] before activation; the
//! waits after activation and during the rollback (warnings only) are left out.
//! Only the newest update in flight on a stream is kept, and only fence ACKs of the
//! instances waited for (nothing else reads ACKs). A NACK is a lost update. A
//! replica's currency check and its send are one step (a version published in
//! between is at most one step newer: a fence, whose ACK the rollout waits for, or
//! the end of a rollout, after which the older version is the fence). A replica
//! cut off from the store cannot restart, nor become current again; a crashed
//! replica restarts; a deposed leader stops at once (the store fences its writes by
//! term). A leader adopts the stored active version when elected (the review
//! finding that a new leader waits on its own snapshot's version is not modelled).
//! A node id shared by two instances is counted per instance (the code refuses the
//! rollout instead, which is safer). Faults are bounded ([`RolloutModel`]'s
//! `max_*`).
//!
//! **Today's behaviours** ([`Bugs::TODAY`]), each found unsafe by the tests:
//! `stale_replica_sends` (a replica sends any version that differs from what the
//! Envoy reports, current or not: `is_due`), `filter_goes_back` (the filter applies
//! any version), `rest_merge` (REST pollers filed as `id@rest`: two with one id are
//! one record), `edge_reads_no_encoded_base` / `guard_passes_unreadable` (the filter
//! does not decode: the edge sends the request to a path rule or the default, the
//! guard passes it), `orphans` (the driver gives up after store errors, `resume`
//! gives up on a store error, and `begin` only checks that no fence is active, so a
//! second rollout plans from a `may_hold` the orphan never updated).
//! [`Bugs::NONE`] is the fixed protocol: a replica sends only a version newer than
//! the one the Envoy runs and only while it can show it is current (linked to the
//! store, its watch at the active version), and ends the streams it cannot serve so
//! that they fail over; the filter refuses an older version (NACK); REST pollers are
//! instances by id and peer; the filter decodes and refuses what it cannot read
//! (`400`), so a guard never passes a base it cannot rule out; the driver retries,
//! `resume` retries, and no rollout begins while one is unfinished.
//!
//! The protocol variants of the earlier model stay ([`Variant`]): no fence, ACKs per
//! node id, guards activating early, requests in flight across a restart.
//!
//! **What `cargo test` checks** (`tests/model.rs`, exhaustive BFS over the bounds
//! there): each of today's behaviours yields a state where O and N both hold B
//! (downgrade by a stale or lagging replica, with and without guards; the replica
//! fix alone suffices, the filter fix alone does not; merged REST pollers; an
//! encoded base through today's edge and guard; a second rollout after an orphan
//! skipping the server that holds B), and the fixed protocol never does, never
//! lets a proxy apply an older version, and can finish (also two rollouts in a
//! row, skipping a restart `may_hold` allows; today's edges behind fixed guards
//! are safe too).
//!
//! **Liveness** ([`liveness`]): under strong fairness of [`RolloutModel::fair`]'s
//! actions (the driver's steps and its timeouts, deliveries, reconnects, polls,
//! watches, elections, replica restarts, the store recovering) every rollout begun
//! ends, done or rolled back, in every run, for the fixed protocol; today's driver
//! that gives up leaves a rollout no fair run ends. Stateright's own `eventually`
//! only judges paths that end in a deadlock, so it is not used. Not proven:
//! anything about time, runs where a fault repeats for ever, bounds beyond the
//! model's. The fairness of the timeout is what ends a rollout whose Envoys never
//! ACK: the code must keep a timeout on every wait before activation.

pub mod liveness;

use stateright::{Model, Property};

/// The safety property: never do two servers hold B at the same time.
pub const TWO_SERVERS_NEVER_HOLD_B: &str = "two servers never hold B";
/// The safety property: no proxy ever applies a version older than the one it runs.
pub const NO_PROXY_GOES_BACK: &str = "no proxy applies an older version";
/// An example: the first rollout reaches done (the model is not vacuous).
pub const ROLLOUT_DONE: &str = "the rollout reaches done";
/// An example: B is served by its new owner after the first rollout.
pub const NEW_OWNER_SERVES_B: &str = "the new owner serves B after the rollout";
/// An example: the first rollout reaches done after a control plane crash, a proxy
/// restart and an edge cut off.
pub const DONE_AFTER_FAULTS: &str = "done after a crash, a proxy restart and a cut-off";
/// An example: the first rollout reaches done while a cut-off edge still serves v1
/// (possible only with guards: without them that edge must ACK the fence).
pub const DONE_WITH_STALE_CUT_EDGE: &str = "done while a cut-off edge still serves v1";
/// An example: the second rollout reaches done.
pub const SECOND_DONE: &str = "the second rollout reaches done";
/// An example: a rollout reached done without restarting a server, as `may_hold`
/// allowed (restarts are planned, not all).
pub const DONE_SKIPPING_A_RESTART: &str = "a rollout done that skipped a restart";

/// A dtable-server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Server {
    /// O, B's owner under v1.
    Old,
    /// N, the other server.
    New,
}

impl Server {
    /// Both servers.
    pub const ALL: [Server; 2] = [Server::Old, Server::New];

    fn idx(self) -> usize {
        self as usize
    }

    fn other(self) -> Server {
        match self {
            Server::Old => Server::New,
            Server::New => Server::Old,
        }
    }

    fn guard(self) -> Proxy {
        match self {
            Server::Old => Proxy::GuardO,
            Server::New => Proxy::GuardN,
        }
    }
}

/// What a map version says about B.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Content {
    /// Version 0, the bootstrap default of a (re)started Envoy: every base fenced.
    Bootstrap,
    /// A map: B → this server.
    Map(Server),
    /// A fence: the map giving B to this server, with B fenced (503).
    Fence(Server),
}

impl Content {
    /// The server B goes to (`None`: fenced, answered locally).
    pub fn routes(self) -> Option<Server> {
        match self {
            Content::Map(s) => Some(s),
            _ => None,
        }
    }

    /// B's owner in the map, fence or not.
    fn map_owner(self) -> Option<Server> {
        match self {
            Content::Map(s) | Content::Fence(s) => Some(s),
            Content::Bootstrap => None,
        }
    }
}

/// At most v1 plus a fence and an end per rollout.
const MAX_VERSIONS: usize = 6;

/// An Envoy instance: two edges, and a guard in front of each server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proxy {
    /// Edge Envoy 1.
    E1,
    /// Edge Envoy 2 (may share its node id with E1).
    E2,
    /// The guard in front of O.
    GuardO,
    /// The guard in front of N.
    GuardN,
}

impl Proxy {
    const ALL: [Proxy; 4] = [Proxy::E1, Proxy::E2, Proxy::GuardO, Proxy::GuardN];
    const EDGES: [Proxy; 2] = [Proxy::E1, Proxy::E2];

    fn idx(self) -> usize {
        self as usize
    }

    fn is_edge(self) -> bool {
        matches!(self, Proxy::E1 | Proxy::E2)
    }
}

/// A rollout's stored step (`rollout::Step`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Not begun.
    Idle,
    /// Planned, nothing published yet.
    Plan,
    /// The fence published; waiting for the fence ACKs.
    Fence,
    /// Fence ACKed: re-check the ACKs, then restart the planned servers.
    Restart,
    /// Restarted: publish the new map, then finish.
    Activate,
    /// Gave up before activation: publish the old map, then finish.
    RollingBack,
    /// Finished: the new map active, `may_hold` updated.
    Done,
    /// Finished: the old map active again.
    RolledBack,
}

impl Step {
    /// The steps that read fence ACKs.
    fn reads_acks(self) -> bool {
        matches!(self, Step::Fence | Step::Restart)
    }

    /// Begun and not finished.
    pub fn unfinished(self) -> bool {
        !matches!(self, Step::Idle | Step::Done | Step::RolledBack)
    }
}

/// One rollout's stored record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rollout {
    /// Its step.
    pub step: Step,
    /// The active version it started from (`from_version`).
    pub from: u8,
    /// Its fence version (0: none yet).
    pub fence: u8,
    /// Its new or rollback version (0: none yet; `from` when nothing was fenced).
    pub to: u8,
    /// The servers it restarts (`restart_plan`), indexed like [`Server`].
    pub restart: [bool; 2],
}

const IDLE: Rollout = Rollout {
    step: Step::Idle,
    from: 0,
    fence: 0,
    to: 0,
    restart: [false; 2],
};

/// How the control plane runs a rollout (the protocol variants of the first model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The protocol: fence, ACKs per instance, restarts after the fence is ACKed.
    Correct,
    /// No fence: plan, restart, publish the new map (the documented nginx procedure).
    NoFence,
    /// ACKs recorded per node id: an ACK of one instance counts for every instance
    /// with that id.
    AckPerNodeId,
    /// With guards, the fence wait ignores the old owner's guard (only G_N must ACK).
    GuardsActivateEarly,
}

/// Today's behaviours at the seams (each `true` is the code before issue 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bugs {
    /// A replica sends any version that differs from what the Envoy reports
    /// (`is_due`), whether or not it can show that it is current.
    pub stale_replica_sends: bool,
    /// The filter applies any version it is given, older ones too.
    pub filter_goes_back: bool,
    /// REST pollers are filed as `id@rest`: two with one node id are one record.
    pub rest_merge: bool,
    /// The edge filter reads no base from a percent-encoded request: it sends it by
    /// a path rule or the default.
    pub edge_reads_no_encoded_base: bool,
    /// The guard filter reads no base from a percent-encoded request: it passes it.
    pub guard_passes_unreadable: bool,
    /// The driver may give up while the store fails, `resume` gives up on a store
    /// error, and `begin` only refuses while a fence is active.
    pub orphans: bool,
}

impl Bugs {
    /// The fixed protocol.
    pub const NONE: Bugs = Bugs {
        stale_replica_sends: false,
        filter_goes_back: false,
        rest_merge: false,
        edge_reads_no_encoded_base: false,
        guard_passes_unreadable: false,
        orphans: false,
    };
    /// The code before issue 16.
    pub const TODAY: Bugs = Bugs {
        stale_replica_sends: true,
        filter_goes_back: true,
        rest_merge: true,
        edge_reads_no_encoded_base: true,
        guard_passes_unreadable: true,
        orphans: true,
    };
}

/// An Envoy's link to the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Conn {
    /// No stream (ADS: reconnecting); a REST poller is always `Idle` while it polls.
    Idle,
    /// An ADS stream on this replica.
    To(u8),
    /// Cut off from every replica (still serving).
    Cut,
}

/// One proxy's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProxyState {
    /// The version it applies (0: bootstrap).
    pub version: u8,
    /// The newest update sent to it and not yet delivered.
    pub inbox: Option<u8>,
    /// Its ACK of the running rollout's fence is in flight (ADS).
    pub fence_ack: bool,
    /// Its link.
    pub conn: Conn,
    /// What its stream's replica believes it runs (reported at subscribe, or last
    /// sent: `StreamType::version`); 0 when unknown or without a stream.
    pub sent: u8,
}

/// One control plane replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Replica {
    /// Running.
    pub up: bool,
    /// Linked to the store (etcd session, watches).
    pub linked: bool,
    /// The version it serves (its snapshot).
    pub served: u8,
}

/// A state of the whole system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The store's active version (the newest published).
    pub active: u8,
    /// What each version says about B (index 0: bootstrap).
    pub contents: [Content; MAX_VERSIONS],
    /// The rollouts, in order.
    pub rollouts: [Rollout; 2],
    /// Per server: the versions (bitmask) it may hold since its last restart
    /// (`None`: unknown, anything).
    pub may_hold: [Option<u8>; 2],
    /// Stored ACK records of the running rollout's fence, by record (instance; or
    /// merged).
    pub acked: [bool; 4],
    /// The replicas (only the first `replicas` are used).
    pub replicas: [Replica; 2],
    /// The leader, if any.
    pub leader: Option<u8>,
    /// The leader drives the newest unfinished rollout.
    pub driver: bool,
    /// The store refuses writes now.
    pub store_failing: bool,
    /// The proxies, indexed like [`Proxy`] (the guards stay idle without guards).
    pub proxies: [ProxyState; 4],
    /// Whether O, N hold B in memory.
    pub holds: [bool; 2],
    /// A request for B routed to O, N and not yet there.
    pub in_flight: [bool; 2],
    /// A proxy applied an older version than it ran.
    pub went_back: bool,
    /// Replica crashes so far.
    pub crashes: u8,
    /// Replicas cut off from the store so far.
    pub store_cuts: u8,
    /// Edges cut off so far.
    pub cut_offs: u8,
    /// Proxy restarts so far.
    pub proxy_restarts: u8,
    /// Store failures so far.
    pub store_errors: u8,
}

impl State {
    /// The state of proxy `p`.
    pub fn proxy(&self, p: Proxy) -> &ProxyState {
        &self.proxies[p.idx()]
    }

    fn proxy_mut(&mut self, p: Proxy) -> &mut ProxyState {
        &mut self.proxies[p.idx()]
    }

    /// Whether `s` holds B.
    pub fn holds(&self, s: Server) -> bool {
        self.holds[s.idx()]
    }

    /// Every rollout begun has ended.
    pub fn rollouts_ended(&self) -> bool {
        self.rollouts.iter().all(|r| !r.step.unfinished())
    }

    /// Replica `r` no longer leads (if it did): no leader, and no driver.
    fn depose(&mut self, r: u8) {
        if self.leader == Some(r) {
            self.leader = None;
            self.driver = false;
        }
    }

    /// The rollout the leader drives: the newest unfinished (`unfinished_rollout`).
    fn driving(&self) -> Option<usize> {
        (0..2).rev().find(|i| self.rollouts[*i].step.unfinished())
    }

    /// The fence version whose ACKs are read now.
    fn reading_fence(&self) -> Option<u8> {
        let r = &self.rollouts[self.driving()?];
        (r.step.reads_acks() && r.fence != 0).then_some(r.fence)
    }

    fn content(&self, v: u8) -> Content {
        self.contents[v as usize]
    }

    /// Whether replica `r` can show that it is current.
    fn current(&self, r: u8) -> bool {
        let rep = self.replicas[r as usize];
        rep.up && rep.linked && rep.served == self.active
    }
}

/// A step of the system; each names the code it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A client request for B through an edge, routed by `Gate::verdict`; a guard
    /// passes it by `Gate::verdict` on its own version.
    Request(Proxy),
    /// A client request naming B percent-encoded, through an edge that reads no base
    /// in it (`Bugs::edge_reads_no_encoded_base`): sent by a path rule or the
    /// default to this server; its guard passes it (`Bugs::guard_passes_unreadable`)
    /// or decodes it (`Gate::verdict` after decoding: passes only when its server
    /// owns B, `400` when unreadable).
    RequestEncoded(Proxy, Server),
    /// A request in flight reaches its server, which then holds B.
    Arrive(Server),
    /// The update in flight reaches the proxy: the filter's `on_configure` applies it
    /// (or refuses an older one), and over ADS it ACKs.
    Deliver(Proxy),
    /// The update in flight is lost (or NACKed).
    LoseUpdate(Proxy),
    /// The proxy's fence ACK reaches its replica and the store (`Registry::handle`,
    /// then the node records).
    Ack(Proxy),
    /// The proxy's fence ACK is lost.
    LoseAck(Proxy),
    /// An ADS stream opens on a replica, reporting the version the Envoy runs
    /// (`Registry::handle`: a request without a nonce), and is sent what is due
    /// (`is_due`).
    Subscribe(Proxy, u8),
    /// A REST poll of a replica reporting the version the Envoy runs
    /// (`Registry::rest_poll`, `api::rest_discovery`), answered with what is due.
    Poll(Proxy, u8),
    /// A replica that cannot show that it is current ends a stream, so that the
    /// Envoy fails over (the fixed protocol).
    EndStream(Proxy),
    /// A follower's watch delivers the next active version (`follow_store`,
    /// `ControlPlane::adopt`); its streams are sent what is due (`Registry::due`).
    Adopt(u8),
    /// A replica linked to the store wins the election and resumes the newest
    /// unfinished rollout (`server::resume_as_leader`, `rollout::resume`).
    Elect(u8),
    /// An operator starts the next rollout (`rollout::begin_with`, planning with
    /// `rollout::restart_plan`).
    Begin,
    /// Driver, plan step: publish the fence (`rollout::advance`, `Step::Plan` and
    /// `Step::Fence`); the active version changed meanwhile: roll back.
    Plan,
    /// Driver: the required instances ACKed the fence (`wait_acks`).
    FenceAcked,
    /// Driver: the ACKs re-checked, the drain waited, the planned servers restarted
    /// (`restart_servers`).
    RestartServers,
    /// Driver: publish the new map (`Step::Activate`).
    Activate,
    /// Driver: a wait timed out, an Envoy NACKed, a hook failed or an abort came,
    /// before activation: go to rolling back (`Rollout::roll_back`).
    RollBack,
    /// Driver: publish the old map again (`Step::RollingBack`).
    PublishRollback,
    /// Driver: store the end and every server's `may_hold` (`rollout::finish`).
    Finish,
    /// The store starts refusing writes (a full disk, no etcd majority).
    StoreFails,
    /// The store accepts writes again.
    StoreRecovers,
    /// Today's driver gives up after repeated store errors (`drive`: 30 failures).
    GiveUp,
    /// A replica crashes: its memory, its leadership and its streams are lost.
    Crash(u8),
    /// A crashed replica starts again, serving the active version (`ControlPlane::open`).
    RestartReplica(u8),
    /// A replica is cut off from the store: it loses leadership, its watches stop,
    /// it keeps serving its Envoys.
    CutFromStore(u8),
    /// An edge is cut off from every replica (it keeps serving).
    CutOff(Proxy),
    /// A proxy restarts: bootstrap default, then a new stream or poll.
    RestartProxy(Proxy),
}

/// The model and its environment.
#[derive(Clone, Debug)]
pub struct RolloutModel {
    /// How the control plane runs a rollout.
    pub variant: Variant,
    /// Today's behaviours at the seams that are on.
    pub bugs: Bugs,
    /// A guard Envoy in front of each server.
    pub guards: bool,
    /// E1 and E2 share one node id.
    pub shared_node_id: bool,
    /// The edges poll REST xDS instead of holding ADS streams.
    pub rest_edges: bool,
    /// Edges (1: E1 only, or 2).
    pub edges: u8,
    /// Control plane replicas (1 or 2).
    pub replicas: u8,
    /// Rollouts an operator may begin (1 or 2).
    pub rollouts: u8,
    /// `may_hold` known for both servers at the start ({v1}); else unknown (the first
    /// rollout restarts every server).
    pub may_hold_known: bool,
    /// Clients send percent-encoded requests.
    pub encoded_requests: bool,
    /// Updates and ACKs may be lost.
    pub lossy_network: bool,
    /// Replica crashes allowed.
    pub max_crashes: u8,
    /// Replicas that may be cut off from the store.
    pub max_store_cuts: u8,
    /// Edges that may be cut off.
    pub max_cut_offs: u8,
    /// Proxy restarts allowed.
    pub max_proxy_restarts: u8,
    /// Store failures allowed.
    pub max_store_errors: u8,
    /// A routed request may reach its server later (waiting for a connection).
    pub requests_in_flight: bool,
    /// The restart step first waits until no request routed to a server it restarts
    /// is still on its way (`[rollout] drain`).
    pub drain_before_restart: bool,
    /// Faults go on after the last rollout ended (else they stop there, where they
    /// can only make proxies serve less unless a replica can send an older map).
    pub faults_after_end: bool,
}

impl RolloutModel {
    /// The first model's environment for `variant`, with or without guards: one
    /// replica, one rollout, ADS edges sharing a node id, two crashes (one with
    /// guards, to keep the check short), two edges cut off, two proxy restarts, a
    /// lossy network; the fixed seams.
    pub fn new(variant: Variant, guards: bool) -> Self {
        RolloutModel {
            variant,
            bugs: Bugs::NONE,
            guards,
            shared_node_id: true,
            rest_edges: false,
            edges: 2,
            replicas: 1,
            rollouts: 1,
            may_hold_known: true,
            encoded_requests: false,
            lossy_network: true,
            max_crashes: if guards { 1 } else { 2 },
            max_store_cuts: 0,
            max_cut_offs: 2,
            max_proxy_restarts: 2,
            max_store_errors: 0,
            requests_in_flight: false,
            drain_before_restart: false,
            faults_after_end: false,
        }
    }

    /// A small environment, every fault off: the scenarios turn on what they need.
    pub fn quiet(bugs: Bugs, guards: bool) -> Self {
        RolloutModel {
            bugs,
            lossy_network: false,
            max_crashes: 0,
            max_cut_offs: 0,
            max_proxy_restarts: 0,
            ..RolloutModel::new(Variant::Correct, guards)
        }
    }

    fn present(&self, p: Proxy) -> bool {
        match p {
            Proxy::E1 => true,
            Proxy::E2 => self.edges > 1,
            Proxy::GuardO | Proxy::GuardN => self.guards,
        }
    }

    fn rest(&self, p: Proxy) -> bool {
        self.rest_edges && p.is_edge()
    }

    /// Where a fence ACK of `p` is recorded: its instance, or (ACKs per node id, or
    /// REST pollers filed as `id@rest`) the record of its node id.
    fn ack_slot(&self, p: Proxy) -> usize {
        let merged = self.shared_node_id
            && (self.variant == Variant::AckPerNodeId || (self.rest_edges && self.bugs.rest_merge));
        match p {
            Proxy::E2 if merged => Proxy::E1.idx(),
            _ => p.idx(),
        }
    }

    /// The instances that must ACK the fence (`Waits::of`).
    fn required(&self) -> &'static [Proxy] {
        match (self.guards, self.variant) {
            (false, _) => &Proxy::EDGES,
            (true, Variant::GuardsActivateEarly) => &[Proxy::GuardN],
            (true, _) => &[Proxy::GuardO, Proxy::GuardN],
        }
    }

    fn waited_for(&self, p: Proxy) -> bool {
        self.required()
            .iter()
            .any(|r| self.ack_slot(*r) == self.ack_slot(p))
    }

    fn fence_acked(&self, s: &State) -> bool {
        self.required()
            .iter()
            .all(|p| !self.present(*p) || s.acked[self.ack_slot(*p)])
    }

    /// Where a request for B through `edge` goes, if anywhere.
    fn route(&self, s: &State, edge: Proxy) -> Option<Server> {
        let target = s.content(s.proxy(edge).version).routes()?;
        self.guard_passes(s, target).then_some(target)
    }

    /// Whether a request for B (read as B) reaches `target` past its guard.
    fn guard_passes(&self, s: &State, target: Server) -> bool {
        !self.guards || s.content(s.proxy(target.guard()).version).routes() == Some(target)
    }

    /// Whether replica `r` sends version `served` to a proxy it believes runs `sent`
    /// (`is_due`; fixed: only newer, and only while current).
    fn due(&self, s: &State, r: u8, sent: u8) -> bool {
        let served = s.replicas[r as usize].served;
        if self.bugs.stale_replica_sends {
            served != sent
        } else {
            served > sent && s.current(r)
        }
    }

    /// Sends what is due on every stream of replica `r` (`Registry::due`).
    fn push(&self, s: &mut State, r: u8) {
        for p in Proxy::ALL {
            if self.present(p) && s.proxy(p).conn == Conn::To(r) && self.due(s, r, s.proxy(p).sent)
            {
                let v = s.replicas[r as usize].served;
                let ps = s.proxy_mut(p);
                ps.inbox = Some(v);
                ps.sent = v;
                // An ACK of an earlier nonce is stale once a newer response is out.
                ps.fence_ack = false;
            }
        }
    }

    /// The leader appends version `c` to the store and serves it (`ControlPlane::publish`).
    fn publish(&self, s: &mut State, c: Content) -> Option<u8> {
        if s.active as usize + 1 >= MAX_VERSIONS {
            return None;
        }
        s.active += 1;
        let v = s.active;
        s.contents[v as usize] = c;
        if let Some(l) = s.leader {
            s.replicas[l as usize].served = v;
            self.push(s, l);
        }
        Some(v)
    }

    /// The version with `owner`'s map: the active one if it has that map already,
    /// else a newly published one (`None`: no version left).
    fn publish_map_unless_active(&self, s: &mut State, owner: Server) -> Option<u8> {
        if s.content(s.active) == Content::Map(owner) {
            Some(s.active)
        } else {
            self.publish(s, Content::Map(owner))
        }
    }

    /// Records what `p` reports running on replica `r`, as an ACK (subscribe, poll).
    fn record_report(&self, s: &mut State, p: Proxy, r: u8) {
        let v = s.proxy(p).version;
        if v == 0 || !s.replicas[r as usize].linked || !self.waited_for(p) {
            return;
        }
        if let Some(f) = s.reading_fence() {
            s.acked[self.ack_slot(p)] = v == f;
        }
    }

    /// Whether the driver may write a step now.
    fn driver_writes(&self, s: &State) -> bool {
        match s.leader {
            Some(l) => {
                let r = s.replicas[l as usize];
                r.up && r.linked && s.driver && !s.store_failing
            }
            None => false,
        }
    }

    /// The action classes under strong fairness for [`liveness`]: the protocol's own
    /// steps (the driver's steps, including the timeout that rolls back), message
    /// delivery, reconnects and polls, watches, elections, replica restarts, the
    /// store recovering. The environment's choices are not fair: requests, losses,
    /// faults, an operator beginning a rollout, today's driver giving up.
    pub fn fair(&self, a: &Action) -> bool {
        !matches!(
            a,
            Action::Request(_)
                | Action::RequestEncoded(..)
                | Action::LoseUpdate(_)
                | Action::LoseAck(_)
                | Action::Begin
                | Action::StoreFails
                | Action::GiveUp
                | Action::Crash(_)
                | Action::CutFromStore(_)
                | Action::CutOff(_)
                | Action::RestartProxy(_)
        )
    }
}

/// Drops the fence ACKs recorded and in flight (a step that no longer reads them).
fn forget_acks(s: &mut State) {
    s.acked = [false; 4];
    for ps in &mut s.proxies {
        ps.fence_ack = false;
    }
}

/// Closes `p`'s stream: what was in flight on it is gone.
fn close_stream(ps: &mut ProxyState) {
    ps.conn = Conn::Idle;
    ps.inbox = None;
    ps.fence_ack = false;
    ps.sent = 0;
}

impl Model for RolloutModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let replica = Replica {
            up: true,
            linked: true,
            served: 1,
        };
        let mut proxies = [ProxyState {
            version: 1,
            inbox: None,
            fence_ack: false,
            conn: Conn::To(0),
            sent: 1,
        }; 4];
        for p in Proxy::ALL {
            if self.rest(p) {
                proxies[p.idx()].conn = Conn::Idle;
                proxies[p.idx()].sent = 0;
            }
        }
        let mut contents = [Content::Bootstrap; MAX_VERSIONS];
        contents[1] = Content::Map(Server::Old);
        let may_hold = if self.may_hold_known {
            Some(1 << 1)
        } else {
            None
        };
        vec![State {
            active: 1,
            contents,
            rollouts: [IDLE; 2],
            may_hold: [may_hold; 2],
            acked: [false; 4],
            replicas: [replica; 2],
            leader: Some(0),
            driver: false,
            store_failing: false,
            proxies,
            holds: [false; 2],
            in_flight: [false; 2],
            went_back: false,
            crashes: 0,
            store_cuts: 0,
            cut_offs: 0,
            proxy_restarts: 0,
            store_errors: 0,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let pending = |t: Server| {
            if self.requests_in_flight {
                s.in_flight[t.idx()]
            } else {
                s.holds(t)
            }
        };
        for e in Proxy::EDGES {
            if !self.present(e) {
                continue;
            }
            if let Some(t) = self.route(s, e)
                && !pending(t)
            {
                actions.push(Action::Request(e));
            }
            if self.encoded_requests && self.bugs.edge_reads_no_encoded_base {
                for t in Server::ALL {
                    if !pending(t) {
                        actions.push(Action::RequestEncoded(e, t));
                    }
                }
            }
        }
        for t in Server::ALL {
            if s.in_flight[t.idx()] {
                actions.push(Action::Arrive(t));
            }
        }
        let faults = self.faults_after_end
            || s.rollouts[self.rollouts as usize - 1].step.unfinished()
            || s.rollouts[self.rollouts as usize - 1].step == Step::Idle;
        let replicas = 0..self.replicas;
        for p in Proxy::ALL {
            if !self.present(p) {
                continue;
            }
            let ps = s.proxy(p);
            if ps.inbox.is_some() {
                actions.push(Action::Deliver(p));
                if self.lossy_network {
                    actions.push(Action::LoseUpdate(p));
                }
            }
            if ps.fence_ack {
                if let Conn::To(r) = ps.conn
                    && s.replicas[r as usize].linked
                {
                    actions.push(Action::Ack(p));
                }
                if self.lossy_network {
                    actions.push(Action::LoseAck(p));
                }
            }
            match ps.conn {
                Conn::Idle => {
                    for r in replicas.clone() {
                        if s.replicas[r as usize].up {
                            actions.push(if self.rest(p) {
                                Action::Poll(p, r)
                            } else {
                                Action::Subscribe(p, r)
                            });
                        }
                    }
                }
                Conn::To(r) => {
                    if !self.bugs.stale_replica_sends && !s.current(r) {
                        actions.push(Action::EndStream(p));
                    }
                }
                Conn::Cut => {}
            }
        }
        for r in replicas.clone() {
            let rep = s.replicas[r as usize];
            if rep.up && rep.linked && rep.served < s.active && s.leader != Some(r) {
                actions.push(Action::Adopt(r));
            }
            if s.leader.is_none() && rep.up && rep.linked {
                actions.push(Action::Elect(r));
            }
            if !rep.up && rep.linked {
                actions.push(Action::RestartReplica(r));
            }
            if faults && rep.up && s.crashes < self.max_crashes {
                actions.push(Action::Crash(r));
            }
            if faults && rep.linked && s.store_cuts < self.max_store_cuts {
                actions.push(Action::CutFromStore(r));
            }
        }
        // The operator begins the next rollout (`begin_with`: the change lock, then
        // today only a fence refuses; fixed: any unfinished rollout refuses).
        if let Some(next) = s.rollouts.iter().position(|r| r.step == Step::Idle)
            && next < self.rollouts as usize
            && let Some(l) = s.leader
            && s.replicas[l as usize].up
            && !s.store_failing
            && !s.driver
        {
            let fenced = matches!(s.content(s.active), Content::Fence(_));
            let unfinished = !s.rollouts_ended();
            if !fenced && (self.bugs.orphans || !unfinished) {
                actions.push(Action::Begin);
            }
        }
        if let Some(i) = s.driving()
            && self.driver_writes(s)
        {
            let r = s.rollouts[i];
            match r.step {
                Step::Plan => actions.push(Action::Plan),
                Step::Fence => {
                    if self.fence_acked(s) {
                        actions.push(Action::FenceAcked);
                    }
                    actions.push(Action::RollBack);
                }
                Step::Restart => {
                    let acked = self.variant == Variant::NoFence || self.fence_acked(s);
                    let drained = !self.drain_before_restart
                        || Server::ALL
                            .iter()
                            .all(|t| !r.restart[t.idx()] || !s.in_flight[t.idx()]);
                    if acked && drained {
                        actions.push(Action::RestartServers);
                    }
                    actions.push(Action::RollBack);
                }
                Step::Activate if r.to == 0 => actions.push(Action::Activate),
                Step::RollingBack if r.to == 0 => actions.push(Action::PublishRollback),
                Step::Activate | Step::RollingBack => actions.push(Action::Finish),
                Step::Idle | Step::Done | Step::RolledBack => {}
            }
        }
        if s.store_failing {
            actions.push(Action::StoreRecovers);
            if self.bugs.orphans && s.driver {
                actions.push(Action::GiveUp);
            }
        } else if faults && s.store_errors < self.max_store_errors {
            actions.push(Action::StoreFails);
        }
        if !faults {
            return;
        }
        if s.cut_offs < self.max_cut_offs {
            for e in Proxy::EDGES {
                if self.present(e) && s.proxy(e).conn != Conn::Cut {
                    actions.push(Action::CutOff(e));
                }
            }
        }
        if s.proxy_restarts < self.max_proxy_restarts {
            for p in Proxy::ALL {
                if self.present(p) && s.proxy(p).conn != Conn::Cut {
                    actions.push(Action::RestartProxy(p));
                }
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Request(e) => {
                let t = self.route(&s, e)?;
                serve(&mut s, t, self.requests_in_flight);
            }
            Action::RequestEncoded(_, t) => {
                // The edge read no base; the guard, if any, decides.
                if self.guards && !self.bugs.guard_passes_unreadable && !self.guard_passes(&s, t) {
                    return Some(s);
                }
                serve(&mut s, t, self.requests_in_flight);
            }
            Action::Arrive(t) => {
                s.in_flight[t.idx()] = false;
                s.holds[t.idx()] = true;
            }
            Action::Deliver(p) => {
                let fence = s.reading_fence();
                let waited = self.waited_for(p) && !self.rest(p);
                let ps = s.proxy_mut(p);
                let v = ps.inbox.take()?;
                let back = v < ps.version;
                if !back || self.bugs.filter_goes_back {
                    // (the same version again is ACKed again)
                    ps.version = v;
                    ps.fence_ack |= waited && Some(v) == fence;
                    s.went_back |= back;
                }
            }
            Action::LoseUpdate(p) => s.proxy_mut(p).inbox = None,
            Action::Ack(p) => {
                s.proxy_mut(p).fence_ack = false;
                s.acked[self.ack_slot(p)] = true;
            }
            Action::LoseAck(p) => s.proxy_mut(p).fence_ack = false,
            Action::Subscribe(p, r) => {
                let ps = s.proxy_mut(p);
                ps.conn = Conn::To(r);
                ps.sent = ps.version;
                self.record_report(&mut s, p, r);
                if self.due(&s, r, s.proxy(p).sent) {
                    let v = s.replicas[r as usize].served;
                    let ps = s.proxy_mut(p);
                    ps.inbox = Some(v);
                    ps.sent = v;
                }
            }
            Action::Poll(p, r) => {
                self.record_report(&mut s, p, r);
                if self.due(&s, r, s.proxy(p).version) {
                    s.proxy_mut(p).inbox = Some(s.replicas[r as usize].served);
                }
            }
            Action::EndStream(p) => close_stream(s.proxy_mut(p)),
            Action::Adopt(r) => {
                s.replicas[r as usize].served += 1;
                self.push(&mut s, r);
            }
            Action::Elect(r) => {
                s.leader = Some(r);
                s.replicas[r as usize].served = s.active;
                self.push(&mut s, r);
                // `resume`: today it gives up on a store error (reported as done).
                let gives_up = self.bugs.orphans && s.store_failing;
                s.driver = !(s.rollouts_ended() || gives_up);
            }
            Action::Begin => {
                let i = s.rollouts.iter().position(|r| r.step == Step::Idle)?;
                let owner = s.content(s.active).map_owner()?;
                let mut restart = [false; 2];
                for t in Server::ALL {
                    // `restart_plan`: unknown, or it owned B under a version it may hold.
                    restart[t.idx()] = match s.may_hold[t.idx()] {
                        None => true,
                        Some(m) => (1..=s.active)
                            .any(|v| m & (1 << v) != 0 && s.content(v).map_owner() == Some(t)),
                    };
                }
                debug_assert!(owner == Server::Old || owner == Server::New);
                s.rollouts[i] = Rollout {
                    step: Step::Plan,
                    from: s.active,
                    fence: 0,
                    to: 0,
                    restart,
                };
                s.driver = true;
            }
            Action::Plan => {
                let i = s.driving()?;
                let r = s.rollouts[i];
                forget_acks(&mut s);
                if s.active != r.from {
                    // `Step::Fence`: the active version changed during the rollout.
                    s.rollouts[i].step = Step::RollingBack;
                } else if self.variant == Variant::NoFence {
                    s.rollouts[i].step = Step::Restart;
                } else {
                    let owner = s.content(r.from).map_owner()?;
                    s.rollouts[i].step = Step::Fence;
                    s.rollouts[i].fence = self.publish(&mut s, Content::Fence(owner))?;
                }
            }
            Action::FenceAcked => {
                let i = s.driving()?;
                s.rollouts[i].step = Step::Restart;
            }
            Action::RestartServers => {
                let i = s.driving()?;
                for t in Server::ALL {
                    if s.rollouts[i].restart[t.idx()] {
                        s.holds[t.idx()] = false;
                    }
                }
                s.rollouts[i].step = Step::Activate;
                forget_acks(&mut s);
            }
            Action::Activate => {
                let i = s.driving()?;
                let new = s.content(s.rollouts[i].from).map_owner()?.other();
                s.rollouts[i].to = self.publish_map_unless_active(&mut s, new)?;
            }
            Action::RollBack => {
                let i = s.driving()?;
                s.rollouts[i].step = Step::RollingBack;
                forget_acks(&mut s);
            }
            Action::PublishRollback => {
                let i = s.driving()?;
                let old = s.content(s.rollouts[i].from).map_owner()?;
                s.rollouts[i].to = self.publish_map_unless_active(&mut s, old)?;
            }
            Action::Finish => {
                let i = s.driving()?;
                let r = s.rollouts[i];
                if r.step == Step::Activate {
                    for t in Server::ALL {
                        let h = &mut s.may_hold[t.idx()];
                        if r.restart[t.idx()] {
                            *h = Some(1 << r.to);
                        } else if let Some(m) = h {
                            *m |= 1 << r.to;
                        }
                    }
                    s.rollouts[i].step = Step::Done;
                } else {
                    // Nothing was restarted before a rollback (the restart step is
                    // one action): `may_hold` stays.
                    s.rollouts[i].step = Step::RolledBack;
                }
                // The driver ends with its rollout (an orphan left by today's code
                // stays unfinished).
                s.driver = false;
            }
            Action::StoreFails => {
                s.store_errors += 1;
                s.store_failing = true;
            }
            Action::StoreRecovers => s.store_failing = false,
            Action::GiveUp => s.driver = false,
            Action::Crash(r) => {
                s.crashes += 1;
                s.replicas[r as usize].up = false;
                s.depose(r);
                for ps in &mut s.proxies {
                    if ps.conn == Conn::To(r) {
                        close_stream(ps);
                    }
                }
            }
            Action::RestartReplica(r) => {
                let rep = &mut s.replicas[r as usize];
                rep.up = true;
                rep.served = s.active;
            }
            Action::CutFromStore(r) => {
                s.store_cuts += 1;
                s.replicas[r as usize].linked = false;
                s.depose(r);
            }
            Action::CutOff(e) => {
                s.cut_offs += 1;
                let ps = s.proxy_mut(e);
                close_stream(ps);
                ps.conn = Conn::Cut;
            }
            Action::RestartProxy(p) => {
                s.proxy_restarts += 1;
                // The stored record keeps what it last reported (`Registry::handle`
                // records no version for a fresh Envoy).
                let ps = s.proxy_mut(p);
                close_stream(ps);
                ps.version = 0;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(TWO_SERVERS_NEVER_HOLD_B, |_, s: &State| {
                !(s.holds(Server::Old) && s.holds(Server::New))
            }),
            Property::always(NO_PROXY_GOES_BACK, |_, s: &State| !s.went_back),
            Property::sometimes(ROLLOUT_DONE, |_, s: &State| {
                s.rollouts[0].step == Step::Done
            }),
            Property::sometimes(NEW_OWNER_SERVES_B, |_, s: &State| {
                s.rollouts[0].step == Step::Done && s.holds(Server::New)
            }),
            Property::sometimes(DONE_AFTER_FAULTS, |_, s: &State| {
                s.rollouts[0].step == Step::Done
                    && s.crashes > 0
                    && s.proxy_restarts > 0
                    && s.cut_offs > 0
            }),
            Property::sometimes(DONE_WITH_STALE_CUT_EDGE, |_, s: &State| {
                s.rollouts[0].step == Step::Done
                    && Proxy::EDGES.iter().any(|e| {
                        let ps = s.proxy(*e);
                        ps.conn == Conn::Cut && ps.version == 1
                    })
            }),
            Property::sometimes(SECOND_DONE, |_, s: &State| s.rollouts[1].step == Step::Done),
            Property::sometimes(DONE_SKIPPING_A_RESTART, |_, s: &State| {
                s.rollouts
                    .iter()
                    .any(|r| r.step == Step::Done && r.restart.contains(&false))
            }),
        ]
    }
}

/// A request for B reaches (or is on its way to) `t`.
fn serve(s: &mut State, t: Server, in_flight: bool) {
    if in_flight {
        s.in_flight[t.idx()] = true;
    } else {
        s.holds[t.idx()] = true;
    }
}
