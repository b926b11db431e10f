//! A model of the rollout protocol, checked with [stateright].
//!
//! ```text
//!                 control plane (stored: step, published version; in memory: ACKs)
//!   plan ─▶ fence ───────────▶ restart ────────────▶ activate ─▶ done
//!           publish v2         re-check the ACKs,    publish v3
//!           wait for the       restart O
//!           required ACKs
//!              │                  │
//!              └──────────────────┴──▶ rolled back: publish v4 (= the old map)
//!
//!   client ─▶ edge E1 / E2 ─┬─(guard G_O)─▶ O      v1, v4: B → O     v3: B → N
//!             (a version)   └─(guard G_N)─▶ N      v2: B fenced (503)
//!                                                  bootstrap: every base fenced
//!
//!   INVARIANT (always): never do O and N both hold B.
//! ```
//!
//! **What is modeled.** One base B moves from its old owner O to its new owner N,
//! by the steps of `control-plane/src/rollout.rs`. The control plane stores its step
//! and the version it publishes; it may crash at any point, losing the ACKs it had
//! seen and every open stream, and resumes from the stored step, sending the
//! published version again on each new stream (a proxy ACKs it again). Without
//! guards every edge must ACK the fence; with guards only G_O and G_N. Each proxy
//! (edges E1, E2, and optionally a guard Envoy in front of each server) applies one
//! version; updates and ACKs may be delayed (any interleaving across proxies) or
//! lost; a stream is FIFO, so a proxy only moves to a newer version or receives the
//! same one again. An edge may be cut off (it keeps serving its version, receives no
//! update, sends no ACK); any proxy may restart: it comes back with the bootstrap
//! default (serves no base) and then gets the published version. E1 and E2 may
//! share a node id. A server holds B once it served a request for B, until it is
//! restarted. A client may send a request for B through any edge at any time: the
//! edge routes it by its version, a guard passes it only when its own version gives
//! B to its server. Optionally ([`RolloutModel::requests_in_flight`]) a routed
//! request reaches its server only later (waiting for a connection, or retried).
//!
//! **What is abstracted away.** Bases do not interact, so one base and two servers
//! suffice. A version is only "who owns B, or fenced". Time: a timeout or a failed
//! hook is a non-deterministic "roll back" allowed until activation; a restart is
//! one step. Only the newest update in flight on a stream is kept (an older one
//! would only make the proxy pass through a version it then leaves, serving less),
//! and only fence ACKs, of the instances waited for, while the control plane reads
//! them: every other ACK changes nothing. A duplicated update is a second delivery
//! of the same version (ACKed again); a duplicated ACK records what is recorded
//! already, so it is not a separate step. A NACK is a lost update (never applied,
//! never ACKed). The correct protocol knows each instance (how live streams are
//! told apart is the control plane's concern). One rollout; the wait for ACKs after
//! activation (warnings only) and a cut-off edge coming back are left out; faults
//! stop once the rollout is finished (after it they only make proxies serve less).
//! The numbers of crashes, cut-offs and proxy restarts are bounded
//! ([`RolloutModel::new`]: two of each).
//!
//! **Variants and the real bugs they stand for** ([`Variant`]):
//! - [`Variant::Correct`]: the protocol above. Safe; can finish (even after crashes,
//!   restarts and a cut-off edge); with guards it finishes although a cut-off edge
//!   still serves the old map, without guards such an edge blocks every rollout.
//! - [`Variant::NoFence`]: reload the map and restart the servers, as SeaTable's
//!   documentation says: an edge not yet updated sends B to O (restarted, so it
//!   loads B again) while an updated one sends it to N.
//! - [`Variant::AckPerNodeId`]: ACKs counted per node id while E1 and E2 share one:
//!   the ACK of E1 stands for E2, which never saw the fence (cut off or just slow)
//!   and still routes B to O after activation (measured from outside: 42 to 46 lost
//!   writes of ~510 per run).
//! - [`Variant::GuardsActivateEarly`]: with guards, the control plane goes on with
//!   only G_N's ACK: G_O, still on the old map, passes B to O.
//!
//! With requests in flight even the correct protocol is unsafe: a request routed to
//! O (and passed by G_O) before the fence reaches O after its restart, while N
//! serves B. [`RolloutModel::drain_before_restart`] (wait longer than a request can
//! wait or be retried before restarting O) closes that gap in the model.

use stateright::{Model, Property};

/// The safety property: never do two servers hold B at the same time.
pub const TWO_SERVERS_NEVER_HOLD_B: &str = "two servers never hold B";
/// An example: the rollout reaches done (the model is not vacuous).
pub const ROLLOUT_DONE: &str = "the rollout reaches done";
/// An example: B is served by its new owner after the rollout.
pub const NEW_OWNER_SERVES_B: &str = "the new owner serves B after the rollout";
/// An example: the rollout reaches done after a control plane crash, a proxy restart
/// and an edge cut off (the faults do not block every rollout).
pub const DONE_AFTER_FAULTS: &str = "done after a crash, a proxy restart and a cut-off";
/// An example: the rollout reaches done while a cut-off edge still serves the old map
/// (possible only with guards: without them that edge must ACK the fence).
pub const DONE_WITH_STALE_CUT_EDGE: &str = "done while a cut-off edge still serves v1";

/// A dtable-server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Server {
    /// O, B's owner under the old map.
    Old,
    /// N, B's owner under the new map.
    New,
}

impl Server {
    fn idx(self) -> usize {
        match self {
            Server::Old => 0,
            Server::New => 1,
        }
    }

    fn guard(self) -> Proxy {
        match self {
            Server::Old => Proxy::GuardO,
            Server::New => Proxy::GuardN,
        }
    }
}

/// A map version, as a proxy applies it. Numbered: a proxy only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// The bootstrap default of a (re)started Envoy: every base fenced.
    Bootstrap,
    /// v1, the old map: B → O.
    V1Old,
    /// v2, the fence: the old map with B fenced (503).
    V2Fence,
    /// v3, the new map: B → N.
    V3New,
    /// v4, the rollback: the old map again (B → O), published instead of v3.
    V4Rollback,
}

impl Version {
    fn number(self) -> u8 {
        match self {
            Version::Bootstrap => 0,
            Version::V1Old => 1,
            Version::V2Fence => 2,
            Version::V3New => 3,
            Version::V4Rollback => 4,
        }
    }

    /// The server B goes to under this version (`None`: fenced, answered locally).
    pub fn owner(self) -> Option<Server> {
        match self {
            Version::V1Old | Version::V4Rollback => Some(Server::Old),
            Version::V3New => Some(Server::New),
            Version::Bootstrap | Version::V2Fence => None,
        }
    }
}

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
        match self {
            Proxy::E1 => 0,
            Proxy::E2 => 1,
            Proxy::GuardO => 2,
            Proxy::GuardN => 3,
        }
    }

    fn is_edge(self) -> bool {
        matches!(self, Proxy::E1 | Proxy::E2)
    }
}

/// The steps of a rollout, as the control plane stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Planned, nothing published yet.
    Plan,
    /// v2 published; waiting for the fence ACKs.
    Fence,
    /// Fence ACKed: re-check the ACKs, then restart O.
    Restart,
    /// O restarted: publish v3.
    Activate,
    /// v3 published.
    Done,
    /// Gave up before activation; v4 published.
    RolledBack,
}

impl Step {
    /// The steps that read fence ACKs (outside them, ACKs are not tracked).
    fn reads_acks(self) -> bool {
        matches!(self, Step::Fence | Step::Restart)
    }

    /// Done or rolled back.
    pub fn finished(self) -> bool {
        matches!(self, Step::Done | Step::RolledBack)
    }
}

/// How the control plane runs the rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The protocol: fence, ACKs per instance, O restarted after the fence is ACKed.
    Correct,
    /// No fence: plan, restart O, publish v3 (the documented nginx procedure).
    NoFence,
    /// ACKs recorded per node id: an ACK of one instance counts for every instance
    /// with that id.
    AckPerNodeId,
    /// With guards, the fence wait ignores the old owner's guard (only G_N must ACK).
    /// Without guards it is [`Variant::Correct`].
    GuardsActivateEarly,
}

/// One proxy's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProxyState {
    /// The version it applies.
    pub version: Version,
    /// The newest update sent on its stream and not yet delivered. (An older one
    /// still in flight would only make it pass through a version it then leaves:
    /// that serves B less, and its ACK is of a version nobody waits for any more.)
    pub inbox: Option<Version>,
    /// Its ACK of the fence is in flight (the only ACK the control plane waits for;
    /// not tracked for a proxy it does not wait for).
    pub fence_ack: bool,
    /// Cut off from the control plane (still serving).
    pub cut: bool,
}

/// The control plane's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ControlPlane {
    /// Running (false: crashed, not yet resumed).
    pub up: bool,
    /// The stored step.
    pub step: Step,
    /// The stored, published version (sent to every stream that opens).
    pub published: Version,
    /// In memory: fence ACKs received, by instance ([`Variant::AckPerNodeId`]: by
    /// node id).
    pub acked: [bool; 4],
}

/// A state of the whole system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The control plane.
    pub cp: ControlPlane,
    /// The proxies, indexed like [`Proxy`] (the guards stay idle without guards).
    pub proxies: [ProxyState; 4],
    /// Whether O, N hold B in memory.
    pub holds: [bool; 2],
    /// A request for B routed to O, N and not yet there (with
    /// [`RolloutModel::requests_in_flight`]).
    pub in_flight: [bool; 2],
    /// Crashes of the control plane so far.
    pub crashes: u8,
    /// Edges cut off so far.
    pub cut_offs: u8,
    /// Proxy restarts so far.
    pub proxy_restarts: u8,
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
}

/// A step of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A client request for B through an edge; the server it reaches holds B (with
    /// [`RolloutModel::requests_in_flight`]: is on its way there).
    Request(Proxy),
    /// A request in flight reaches its server, which then holds B.
    Arrive(Server),
    /// The update in flight reaches the proxy (applied if newer, then ACKed).
    Deliver(Proxy),
    /// The update in flight is lost.
    LoseUpdate(Proxy),
    /// The proxy's fence ACK reaches the control plane.
    Ack(Proxy),
    /// The proxy's fence ACK is lost.
    LoseAck(Proxy),
    /// Control plane: leave the plan (publish v2; [`Variant::NoFence`]: go to restart).
    Plan,
    /// Control plane: the required instances ACKed the fence.
    FenceAcked,
    /// Control plane: the fence ACKs re-checked, restart O.
    RestartOldOwner,
    /// Control plane: publish v3.
    Activate,
    /// Control plane: a wait timed out (or a hook failed) before activation: publish
    /// v4.
    RollBack,
    /// The control plane crashes: its memory and every stream are lost.
    Crash,
    /// The control plane starts again, resumes the stored step and sends the
    /// published version on every new stream.
    Resume,
    /// An edge is cut off from the control plane.
    CutOff(Proxy),
    /// A proxy restarts (bootstrap default, then the published version).
    RestartProxy(Proxy),
}

/// The model and its environment.
#[derive(Clone, Debug)]
pub struct RolloutModel {
    /// How the control plane runs the rollout.
    pub variant: Variant,
    /// A guard Envoy in front of each server.
    pub guards: bool,
    /// E1 and E2 share one node id.
    pub shared_node_id: bool,
    /// Updates and ACKs may be lost.
    pub lossy_network: bool,
    /// Crashes of the control plane allowed.
    pub max_crashes: u8,
    /// Edges that may be cut off.
    pub max_cut_offs: u8,
    /// Proxy restarts allowed.
    pub max_proxy_restarts: u8,
    /// A request routed (and passed by a guard) may reach its server later: it waits
    /// for a connection or is retried. Off: routing and serving are one step.
    pub requests_in_flight: bool,
    /// The restart step first waits until no request routed to O is still on its way
    /// (in the real system: a delay longer than a request can wait or be retried).
    pub drain_before_restart: bool,
}

impl RolloutModel {
    /// The full environment for `variant`, with or without guards: two control plane
    /// crashes, two edges cut off, two proxy restarts, a lossy network, E1 and E2
    /// sharing a node id; requests are served in one step.
    pub fn new(variant: Variant, guards: bool) -> Self {
        RolloutModel {
            variant,
            guards,
            shared_node_id: true,
            lossy_network: true,
            max_crashes: 2,
            max_cut_offs: 2,
            max_proxy_restarts: 2,
            requests_in_flight: false,
            drain_before_restart: false,
        }
    }

    fn present(&self, p: Proxy) -> bool {
        self.guards || p.is_edge()
    }

    fn node_id(&self, p: Proxy) -> usize {
        match p {
            Proxy::E2 if self.shared_node_id => Proxy::E1.idx(),
            _ => p.idx(),
        }
    }

    /// Where the control plane records a fence ACK of `p`.
    fn ack_slot(&self, p: Proxy) -> usize {
        match self.variant {
            Variant::AckPerNodeId => self.node_id(p),
            _ => p.idx(),
        }
    }

    /// The instances that must ACK the fence.
    fn required(&self) -> &'static [Proxy] {
        match (self.guards, self.variant) {
            (false, _) => &Proxy::EDGES,
            (true, Variant::GuardsActivateEarly) => &[Proxy::GuardN],
            (true, _) => &[Proxy::GuardO, Proxy::GuardN],
        }
    }

    /// Whether the control plane waits for an ACK of `p` (else its ACKs are not
    /// tracked: they change nothing).
    fn waited_for(&self, p: Proxy) -> bool {
        self.required()
            .iter()
            .any(|r| self.ack_slot(*r) == self.ack_slot(p))
    }

    fn fence_acked(&self, s: &State) -> bool {
        self.required()
            .iter()
            .all(|p| s.cp.acked[self.ack_slot(*p)])
    }

    /// The server a request for B through `edge` reaches, if any.
    fn route(&self, s: &State, edge: Proxy) -> Option<Server> {
        let target = s.proxy(edge).version.owner()?;
        if self.guards && s.proxy(target.guard()).version.owner() != Some(target) {
            return None;
        }
        Some(target)
    }

    /// Sends `v` on the stream of every connected proxy.
    fn publish(&self, s: &mut State, v: Version) {
        s.cp.published = v;
        for p in Proxy::ALL {
            if self.present(p) && !s.proxy(p).cut {
                s.proxy_mut(p).inbox = Some(v);
            }
        }
    }
}

/// Drops the fence ACKs received and in flight (a crash, or a step that no longer
/// reads them).
fn forget_acks(s: &mut State) {
    s.cp.acked = [false; 4];
    for ps in &mut s.proxies {
        ps.fence_ack = false;
    }
}

impl Model for RolloutModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let proxy = ProxyState {
            version: Version::V1Old,
            inbox: None,
            fence_ack: false,
            cut: false,
        };
        vec![State {
            cp: ControlPlane {
                up: true,
                step: Step::Plan,
                published: Version::V1Old,
                acked: [false; 4],
            },
            proxies: [proxy; 4],
            holds: [false, false],
            in_flight: [false, false],
            crashes: 0,
            cut_offs: 0,
            proxy_restarts: 0,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for e in Proxy::EDGES {
            if let Some(target) = self.route(s, e) {
                let pending = if self.requests_in_flight {
                    s.in_flight[target.idx()]
                } else {
                    s.holds(target)
                };
                if !pending {
                    actions.push(Action::Request(e));
                }
            }
        }
        for server in [Server::Old, Server::New] {
            if s.in_flight[server.idx()] {
                actions.push(Action::Arrive(server));
            }
        }
        for p in Proxy::ALL {
            let ps = s.proxy(p);
            if ps.inbox.is_some() {
                actions.push(Action::Deliver(p));
                if self.lossy_network {
                    actions.push(Action::LoseUpdate(p));
                }
            }
            if ps.fence_ack {
                if s.cp.up {
                    actions.push(Action::Ack(p));
                }
                if self.lossy_network {
                    actions.push(Action::LoseAck(p));
                }
            }
        }
        if s.cp.step.finished() {
            // After the end, faults can only make proxies serve less: not explored.
            return;
        }
        if s.cp.up {
            match s.cp.step {
                Step::Plan => actions.push(Action::Plan),
                Step::Fence => {
                    if self.fence_acked(s) {
                        actions.push(Action::FenceAcked);
                    }
                    actions.push(Action::RollBack);
                }
                Step::Restart => {
                    let acked = self.variant == Variant::NoFence || self.fence_acked(s);
                    let drained = !self.drain_before_restart || !s.in_flight[Server::Old.idx()];
                    if acked && drained {
                        actions.push(Action::RestartOldOwner);
                    }
                    actions.push(Action::RollBack);
                }
                Step::Activate => actions.push(Action::Activate),
                Step::Done | Step::RolledBack => {}
            }
            if s.crashes < self.max_crashes {
                actions.push(Action::Crash);
            }
        } else {
            actions.push(Action::Resume);
        }
        if s.cut_offs < self.max_cut_offs {
            for e in Proxy::EDGES {
                if !s.proxy(e).cut {
                    actions.push(Action::CutOff(e));
                }
            }
        }
        if s.proxy_restarts < self.max_proxy_restarts {
            for p in Proxy::ALL {
                if self.present(p) && !s.proxy(p).cut {
                    actions.push(Action::RestartProxy(p));
                }
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Request(e) => {
                let target = self.route(&s, e)?;
                if self.requests_in_flight {
                    s.in_flight[target.idx()] = true;
                } else {
                    s.holds[target.idx()] = true;
                }
            }
            Action::Arrive(server) => {
                s.in_flight[server.idx()] = false;
                s.holds[server.idx()] = true;
            }
            Action::Deliver(p) => {
                let waited = self.waited_for(p) && s.cp.step.reads_acks();
                let ps = s.proxy_mut(p);
                let v = ps.inbox.take()?;
                // A stream is FIFO: an older version never overtakes a newer one. The
                // same version again (a resumed control plane sends it) is ACKed again.
                if v.number() >= ps.version.number() {
                    ps.version = v;
                    ps.fence_ack |= v == Version::V2Fence && waited;
                }
            }
            Action::LoseUpdate(p) => s.proxy_mut(p).inbox = None,
            Action::Ack(p) => {
                s.proxy_mut(p).fence_ack = false;
                s.cp.acked[self.ack_slot(p)] = true;
            }
            Action::LoseAck(p) => s.proxy_mut(p).fence_ack = false,
            Action::Plan => {
                if self.variant == Variant::NoFence {
                    s.cp.step = Step::Restart;
                } else {
                    s.cp.step = Step::Fence;
                    self.publish(&mut s, Version::V2Fence);
                }
            }
            Action::FenceAcked => s.cp.step = Step::Restart,
            Action::RestartOldOwner => {
                s.holds[Server::Old.idx()] = false;
                s.cp.step = Step::Activate;
                forget_acks(&mut s);
            }
            Action::Activate => {
                s.cp.step = Step::Done;
                self.publish(&mut s, Version::V3New);
            }
            Action::RollBack => {
                s.cp.step = Step::RolledBack;
                forget_acks(&mut s);
                self.publish(&mut s, Version::V4Rollback);
            }
            Action::Crash => {
                // Memory and every open stream are gone; the store stays.
                s.crashes += 1;
                s.cp.up = false;
                forget_acks(&mut s);
                for ps in &mut s.proxies {
                    ps.inbox = None;
                }
            }
            Action::Resume => {
                s.cp.up = true;
                let v = s.cp.published;
                self.publish(&mut s, v);
            }
            Action::CutOff(e) => {
                s.cut_offs += 1;
                let ps = s.proxy_mut(e);
                ps.cut = true;
                ps.inbox = None;
                ps.fence_ack = false;
            }
            Action::RestartProxy(p) => {
                s.proxy_restarts += 1;
                // Its stream closes: the control plane forgets its ACK; a new stream
                // gets the published version.
                s.cp.acked[self.ack_slot(p)] = false;
                let (up, published) = (s.cp.up, s.cp.published);
                *s.proxy_mut(p) = ProxyState {
                    version: Version::Bootstrap,
                    inbox: up.then_some(published),
                    fence_ack: false,
                    cut: false,
                };
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(TWO_SERVERS_NEVER_HOLD_B, |_, s: &State| {
                !(s.holds(Server::Old) && s.holds(Server::New))
            }),
            Property::sometimes(ROLLOUT_DONE, |_, s: &State| s.cp.step == Step::Done),
            Property::sometimes(NEW_OWNER_SERVES_B, |_, s: &State| {
                s.cp.step == Step::Done && s.holds(Server::New)
            }),
            Property::sometimes(DONE_AFTER_FAULTS, |_, s: &State| {
                s.cp.step == Step::Done && s.crashes > 0 && s.proxy_restarts > 0 && s.cut_offs > 0
            }),
            Property::sometimes(DONE_WITH_STALE_CUT_EDGE, |_, s: &State| {
                s.cp.step == Step::Done
                    && Proxy::EDGES.iter().any(|e| {
                        let ps = s.proxy(*e);
                        ps.cut && ps.version == Version::V1Old
                    })
            }),
        ]
    }
}
