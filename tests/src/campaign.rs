//! A seeded fault campaign (issue 16, section 7): real processes, faults drawn from a
//! seed, writers counted against storage, and a checker.
//!
//! ```text
//!  writers ─▶ edge-grpc ──relays(127.0.0.20)──▶ ┌ r0 ┐ ──relays(127.0.0.10)──▶ ┌ etcd m0 ┐
//!  writers ─▶ edge-rest ──relays(127.0.0.21)──▶ │ r1 │ ──relays(127.0.0.11)──▶ │ etcd m1 │
//!  writers ─▶ duplicates (same node ids, .22/.23) └ r2 ┘ ──relays(127.0.0.12)──▶ └ etcd m2 ┘
//!                 │                                  (ECDS to guards)
//!                 ▼
//!   [guard-dtable-server] [guard-dtable-server-2]   (with --guards)
//!                 ▼                 ▼
//!          dtable-server     dtable-server-2   (fake: load on first use, save every 2 s)
//! ```
//!
//! A [`Schedule`] is a pure function of its seed ([`Schedule::generate`], a splitmix64
//! [`Rng`]): a list of steps, each maybe applying one [`Fault`] that heals a few steps
//! later, maybe pushing the other of two maps (bases 4-7 moving between the servers)
//! through a live replica. [`run`] executes it and then heals everything, and the
//! checker ([`Report::violations`]) asks three things:
//! - no acknowledged write is missing from storage at the end;
//! - no base was loaded by two servers at once since their last restarts (from the
//!   fake servers' own event logs, [`double_service`]);
//! - every rollout ended (`done` or `rolled_back`) within [`ROLLOUT_BOUND`] after the
//!   faults healed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::dtable::{Cluster, DoubleService, WriteLog, Writers, double_service, spread_bases};
use crate::etcd::EtcdCluster;
use crate::lost_writes::{BASES, ENVOY_SERVERS, MAX_WRITES_PER_THREAD, SAVE_INTERVAL, moved};
use crate::relay::Relay;
use crate::replicas::{LEASE_TTL, ROLLOUT_LIMIT, TAKEOVER_LIMIT, envoy_map_version, leads};
use crate::rollout::{
    ControlPlaneProcess, TOKEN, new_map, old_map, slow_hook, start_guard, start_managed_envoy,
};
use crate::{Envoy, free_port, loopback, wait_until, wasm_file};

/// The bound on every rollout's end, counted from the moment every fault healed.
pub const ROLLOUT_BOUND: Duration = ROLLOUT_LIMIT;
/// Writer threads per Envoy.
const THREADS: usize = 2;
/// The longest a fault stays, in steps.
const MAX_HEAL_STEPS: u64 = 3;
/// At most this many faults at once.
const MAX_ACTIVE: usize = 3;

// ---------------------------------------------------------------------------
// The random source
// ---------------------------------------------------------------------------

/// splitmix64: small, seedable, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---------------------------------------------------------------------------
// Faults and schedules
// ---------------------------------------------------------------------------

/// The kinds of fault a schedule draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL of a replica (started again when it heals).
    ReplicaKill,
    /// SIGSTOP of a replica (SIGCONT when it heals).
    ReplicaPause,
    /// Every link between a replica and etcd silently cut (relays); it stays up for its
    /// Envoys.
    ReplicaEtcdCut,
    /// Every xDS link of one Envoy silently cut; it keeps serving with the map it has.
    EnvoyXdsCut,
    /// An etcd member SIGKILLed (started again on its data when it heals).
    EtcdMemberKill,
    /// An edge Envoy stopped and started again (no map until a replica gives one).
    EnvoyRestart,
    /// A second Envoy started with an existing node id and transport (from another
    /// address), with its own writers; stopped when it heals.
    DuplicateNodeId,
    /// A dtable-server restarted by its hook (graceful: final save) outside a rollout.
    DtableRestart,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::ReplicaKill,
        FaultKind::ReplicaPause,
        FaultKind::ReplicaEtcdCut,
        FaultKind::EnvoyXdsCut,
        FaultKind::EtcdMemberKill,
        FaultKind::EnvoyRestart,
        FaultKind::DuplicateNodeId,
        FaultKind::DtableRestart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ReplicaKill => "replica-kill",
            FaultKind::ReplicaPause => "replica-pause",
            FaultKind::ReplicaEtcdCut => "replica-etcd-cut",
            FaultKind::EnvoyXdsCut => "envoy-xds-cut",
            FaultKind::EtcdMemberKill => "etcd-member-kill",
            FaultKind::EnvoyRestart => "envoy-restart",
            FaultKind::DuplicateNodeId => "duplicate-node-id",
            FaultKind::DtableRestart => "dtable-restart",
        }
    }

    /// By [`FaultKind::name`].
    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// The Envoys writers go through: two edges, and the duplicate of each (same node id,
/// same transport, another source address) while a [`FaultKind::DuplicateNodeId`]
/// lasts.
pub const SLOTS: [(&str, Transport); 4] = [
    ("edge-grpc", Transport::Grpc),
    ("edge-rest", Transport::Rest),
    ("edge-grpc", Transport::Grpc),
    ("edge-rest", Transport::Rest),
];

/// How an Envoy gets its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// ADS over gRPC.
    Grpc,
    /// REST-JSON polling (`api_type: REST`).
    Rest,
}

/// One fault with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    ReplicaKill(usize),
    ReplicaPause(usize),
    ReplicaEtcdCut(usize),
    /// Of the Envoy in slot `n` of [`SLOTS`].
    EnvoyXdsCut(usize),
    EtcdMemberKill(usize),
    /// Of the edge in slot `n` (0 or 1).
    EnvoyRestart(usize),
    /// Slot `n` (2 or 3) started, a duplicate of slot `n - 2`.
    DuplicateNodeId(usize),
    /// Of server `n` of [`ENVOY_SERVERS`].
    DtableRestart(usize),
}

impl Fault {
    pub fn kind(self) -> FaultKind {
        match self {
            Fault::ReplicaKill(_) => FaultKind::ReplicaKill,
            Fault::ReplicaPause(_) => FaultKind::ReplicaPause,
            Fault::ReplicaEtcdCut(_) => FaultKind::ReplicaEtcdCut,
            Fault::EnvoyXdsCut(_) => FaultKind::EnvoyXdsCut,
            Fault::EtcdMemberKill(_) => FaultKind::EtcdMemberKill,
            Fault::EnvoyRestart(_) => FaultKind::EnvoyRestart,
            Fault::DuplicateNodeId(_) => FaultKind::DuplicateNodeId,
            Fault::DtableRestart(_) => FaultKind::DtableRestart,
        }
    }

    /// Whether it lasts (healed later) rather than happening at once.
    pub fn lasts(self) -> bool {
        !matches!(self, Fault::EnvoyRestart(_) | Fault::DtableRestart(_))
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Fault::ReplicaKill(r) | Fault::ReplicaPause(r) | Fault::ReplicaEtcdCut(r) => {
                write!(f, "{}(r{r})", self.kind().name())
            }
            Fault::EtcdMemberKill(m) => write!(f, "{}(m{m})", self.kind().name()),
            Fault::EnvoyXdsCut(s) | Fault::EnvoyRestart(s) | Fault::DuplicateNodeId(s) => {
                write!(f, "{}({}#{s})", self.kind().name(), SLOTS[s].0)
            }
            Fault::DtableRestart(s) => write!(f, "{}({})", self.kind().name(), ENVOY_SERVERS[s]),
        }
    }
}

/// One step of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub fault: Option<Fault>,
    /// The step at whose end the fault heals (for a fault that lasts).
    pub heal_at: usize,
    /// Push the other map, through replica `n` (or the next live one).
    pub push: Option<usize>,
    /// How long the step lasts.
    pub millis: u64,
}

/// What a seed expands to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub guards: bool,
    pub steps: Vec<Step>,
}

impl Schedule {
    /// The schedule of `seed`: `steps` steps, faults drawn from `kinds` only. A fault
    /// is drawn only where it applies (one fault per replica at a time, one etcd
    /// member down at a time, at most [`MAX_ACTIVE`] at once), so the same seed always
    /// gives the same schedule.
    pub fn generate(seed: u64, guards: bool, steps: usize, kinds: &[FaultKind]) -> Schedule {
        let mut rng = Rng::new(seed);
        // What is impaired, and until which step.
        let mut active: Vec<(Fault, usize)> = Vec::new();
        let mut out = Vec::with_capacity(steps);
        for i in 0..steps {
            active.retain(|&(_, heal)| heal >= i);
            let mut fault = None;
            if active.len() < MAX_ACTIVE && rng.chance(80) && !kinds.is_empty() {
                let kind = kinds[rng.below(kinds.len() as u64) as usize];
                fault = pick_target(kind, &active, &mut rng);
            }
            let heal_at = i + rng.below(MAX_HEAL_STEPS) as usize;
            if let Some(f) = fault.filter(|f| f.lasts()) {
                active.push((f, heal_at));
            }
            let push = rng.chance(55).then(|| rng.below(3) as usize);
            let millis = 1200 + rng.below(1800);
            out.push(Step {
                fault,
                heal_at,
                push,
                millis,
            });
        }
        Schedule {
            seed,
            guards,
            steps: out,
        }
    }

    /// How many faults of each kind it applies.
    pub fn counts(&self) -> BTreeMap<FaultKind, usize> {
        let mut c = BTreeMap::new();
        for f in self.steps.iter().filter_map(|s| s.fault) {
            *c.entry(f.kind()).or_default() += 1;
        }
        c
    }

    /// One line per step, to replay by eye.
    pub fn describe(&self) -> String {
        let mut s = format!("schedule seed={} guards={}\n", self.seed, self.guards);
        for (i, st) in self.steps.iter().enumerate() {
            let fault = match st.fault {
                Some(f) if f.lasts() => format!("{f} until step {}", st.heal_at),
                Some(f) => f.to_string(),
                None => "-".into(),
            };
            let push = st
                .push
                .map(|r| format!(" push via r{r}"))
                .unwrap_or_default();
            s.push_str(&format!("  step {i}: {fault}{push} ({} ms)\n", st.millis));
        }
        s
    }
}

fn pick_target(kind: FaultKind, active: &[(Fault, usize)], rng: &mut Rng) -> Option<Fault> {
    let busy_replica = |r: usize| {
        active.iter().any(|(f, _)| {
            matches!(f, Fault::ReplicaKill(x) | Fault::ReplicaPause(x) | Fault::ReplicaEtcdCut(x) if *x == r)
        })
    };
    let dup_live = |s: usize| active.iter().any(|(f, _)| *f == Fault::DuplicateNodeId(s));
    let choose = |rng: &mut Rng, c: Vec<usize>| {
        (!c.is_empty()).then(|| c[rng.below(c.len() as u64) as usize])
    };
    match kind {
        FaultKind::ReplicaKill | FaultKind::ReplicaPause | FaultKind::ReplicaEtcdCut => {
            let r = choose(rng, (0..3).filter(|&r| !busy_replica(r)).collect())?;
            Some(match kind {
                FaultKind::ReplicaKill => Fault::ReplicaKill(r),
                FaultKind::ReplicaPause => Fault::ReplicaPause(r),
                _ => Fault::ReplicaEtcdCut(r),
            })
        }
        FaultKind::EtcdMemberKill => {
            let down = active
                .iter()
                .any(|(f, _)| matches!(f, Fault::EtcdMemberKill(_)));
            (!down).then(|| Fault::EtcdMemberKill(rng.below(3) as usize))
        }
        FaultKind::EnvoyXdsCut => {
            let slots = (0..4)
                .filter(|&s| s < 2 || dup_live(s))
                .filter(|&s| !active.iter().any(|(f, _)| *f == Fault::EnvoyXdsCut(s)))
                .collect();
            choose(rng, slots).map(Fault::EnvoyXdsCut)
        }
        FaultKind::EnvoyRestart => Some(Fault::EnvoyRestart(rng.below(2) as usize)),
        FaultKind::DuplicateNodeId => {
            choose(rng, (2..4).filter(|&s| !dup_live(s)).collect()).map(Fault::DuplicateNodeId)
        }
        FaultKind::DtableRestart => Some(Fault::DtableRestart(rng.below(2) as usize)),
    }
}

// ---------------------------------------------------------------------------
// The topology
// ---------------------------------------------------------------------------

/// An Envoy slot: its process, its relays (one per replica), its writers.
struct Slot {
    envoy: Option<Envoy>,
    relays: Vec<Relay>,
    writers: Option<Writers>,
    /// The highest map version seen applied by the current process.
    seen: Option<u64>,
}

/// Everything of one schedule; dropped Envoys first, etcd last.
struct World {
    slots: Vec<Option<Slot>>,
    guards: Vec<Envoy>,
    replicas: Vec<ControlPlaneProcess>,
    /// `etcd_links[r][m]`: replica `r`'s link to member `m`.
    etcd_links: Vec<Vec<Relay>>,
    cluster: Cluster,
    etcd: EtcdCluster,
    dir: tempfile::TempDir,
    logs: BTreeMap<usize, WriteLog>,
    began: Instant,
    timeline: Vec<String>,
    /// The logs of Envoys that stopped: (file name, text).
    envoy_logs: Vec<(String, String)>,
    /// Replicas that failed to start again when their kill healed.
    down: Vec<usize>,
    /// Whether the last accepted push was the new map (when no replica tells).
    pushed_new: bool,
}

fn source(octet: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, octet])
}

impl World {
    fn start(guards: bool) -> Result<World> {
        let dir = tempfile::Builder::new()
            .prefix("seashard-campaign-")
            .tempdir()?;
        let etcd = EtcdCluster::start(3)?;
        etcd.wait_healthy(Duration::from_secs(30))?;
        let cluster = Cluster::start(&ENVOY_SERVERS, SAVE_INTERVAL)?;
        let mut etcd_links = Vec::new();
        for r in 0..3u8 {
            let links = (0..etcd.len())
                .map(|m| Relay::start(etcd.client_addr(m), source(10 + r)))
                .collect::<Result<Vec<_>>>()?;
            etcd_links.push(links);
        }
        let guard_addrs: Vec<SocketAddr> = if guards {
            (0..cluster.servers.len())
                .map(|_| free_port().map(loopback))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let mut w = World {
            slots: (0..SLOTS.len()).map(|_| None).collect(),
            guards: Vec::new(),
            replicas: Vec::new(),
            etcd_links,
            cluster,
            etcd,
            dir,
            logs: BTreeMap::new(),
            began: Instant::now(),
            timeline: Vec::new(),
            pushed_new: false,
            down: Vec::new(),
            envoy_logs: Vec::new(),
        };
        for r in 0..3 {
            let (config, http, grpc) = w.write_config(r, &guard_addrs)?;
            let cp = ControlPlaneProcess::start(&config, http, grpc)
                .with_context(|| format!("start replica r{r}"))?;
            w.replicas.push(cp);
        }
        wait_until(TAKEOVER_LIMIT, "a replica to lead", || {
            Ok((0..3).any(|r| leads(w.replicas[r].http)).then_some(()))
        })?;
        let grpcs: Vec<String> = w.replicas.iter().map(|r| r.grpc.to_string()).collect();
        let mut others = Vec::new();
        for g in &grpcs[1..] {
            others.extend(["--control-plane", g.as_str()]);
        }
        for (s, listen) in w.cluster.servers.iter().zip(&guard_addrs) {
            let g = start_guard(s, &others, w.replicas[0].grpc, *listen)
                .with_context(|| format!("start guard-{}", s.name))?;
            w.guards.push(g);
        }
        let mut ids: Vec<String> = w
            .cluster
            .servers
            .iter()
            .take(guard_addrs.len())
            .map(|s| format!("guard-{}", s.name))
            .collect();
        for (s, (id, _)) in SLOTS.iter().enumerate().take(2) {
            w.open_slot(s)?;
            ids.push((*id).to_owned());
        }
        w.wait_current(&ids, Duration::from_secs(40))?;
        Ok(w)
    }

    fn write_config(
        &self,
        r: usize,
        guards: &[SocketAddr],
    ) -> Result<(PathBuf, SocketAddr, SocketAddr)> {
        let d = self.dir.path().join(format!("r{r}"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("initial.json"), old_map().to_string())?;
        let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
        let endpoints: Vec<String> = self.etcd_links[r]
            .iter()
            .map(|l| format!("http://{}", l.addr))
            .collect();
        let mut text = format!(
            "initial_map = \"initial.json\"\n\
             [listen]\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n\
             keepalive_interval = \"2s\"\nkeepalive_timeout = \"2s\"\n\
             [store]\nkind = \"etcd\"\nendpoints = {}\nprefix = \"/campaign\"\n\
             replica = \"r{r}\"\nlease_ttl = \"{LEASE_TTL}\"\ntimeout = \"2s\"\n\
             [api]\ntoken = \"{TOKEN}\"\n\
             [filter]\nwasm = {:?}\nretry_after = 1\n\
             [rollout]\nack_timeout = \"4s\"\nhealth_timeout = \"10s\"\n\
             restart_timeout = \"20s\"\ndrain = \"200ms\"\n",
            serde_json::to_string(&endpoints)?,
            wasm_file("base_router.wasm")?,
        );
        for (i, s) in self.cluster.servers.iter().enumerate() {
            let address = guards.get(i).copied().unwrap_or(s.addr);
            text.push_str(&format!(
                "[[server]]\nname = \"{}\"\naddress = \"{address}\"\nguarded = {}\n\
                 restart = {{ kind = \"command\", argv = {} }}\n",
                s.name,
                !guards.is_empty(),
                serde_json::to_string(&slow_hook(s.restart_hook()?))?
            ));
        }
        let path = d.join("seashard.toml");
        std::fs::write(&path, text)?;
        Ok((path, http, grpc))
    }

    fn note(&mut self, what: String) {
        let line = format!("{:>6} ms {what}", self.began.elapsed().as_millis());
        self.timeline.push(line);
    }

    /// Starts slot `s`: relays to every replica (gRPC or HTTP address by transport),
    /// the Envoy, its writers.
    fn open_slot(&mut self, s: usize) -> Result<()> {
        let (_, transport) = SLOTS[s];
        let relays = self
            .replicas
            .iter()
            .map(|cp| {
                let target = match transport {
                    Transport::Grpc => cp.grpc,
                    Transport::Rest => cp.http,
                };
                Relay::start(target, source(20 + s as u8))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut slot = Slot {
            envoy: None,
            relays,
            writers: None,
            seen: None,
        };
        let envoy = start_slot_envoy(s, &slot.relays)?;
        slot.writers = Some(Writers::start(
            envoy.listener_addr,
            &spread_bases(BASES),
            THREADS,
            MAX_WRITES_PER_THREAD,
        ));
        slot.envoy = Some(envoy);
        self.slots[s] = Some(slot);
        Ok(())
    }

    fn close_slot(&mut self, s: usize) {
        if let Some(mut slot) = self.slots[s].take() {
            if let Some(w) = slot.writers.take() {
                self.logs.entry(s).or_default().absorb(w.stop());
            }
            if let Some(e) = slot.envoy.take() {
                self.keep_envoy_log(s, &e);
            }
        }
    }

    /// Keeps the log of an Envoy about to stop, for the evidence of a failed schedule.
    fn keep_envoy_log(&mut self, s: usize, e: &Envoy) {
        let n = self.envoy_logs.len();
        self.envoy_logs
            .push((format!("envoy-{n}-{}-slot{s}.log", SLOTS[s].0), e.logs()));
    }

    /// Writes the logs of every process of this schedule under `dir`.
    fn save_evidence(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        for (r, cp) in self.replicas.iter().enumerate() {
            std::fs::write(dir.join(format!("replica-r{r}.log")), cp.logs())?;
        }
        for (name, text) in &self.envoy_logs {
            std::fs::write(dir.join(name), text)?;
        }
        for (i, g) in self.guards.iter().enumerate() {
            std::fs::write(dir.join(format!("guard-{i}.log")), g.logs())?;
        }
        for srv in &self.cluster.servers {
            let _ = std::fs::copy(srv.log_path(), dir.join(format!("events-{}.log", srv.name)));
        }
        std::fs::write(dir.join("timeline.txt"), self.timeline.join("\n"))?;
        Ok(())
    }

    /// Waits until every id is connected and current as a leader sees it.
    fn wait_current(&self, ids: &[String], timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("{ids:?} to be current"), || {
            let Some(l) = (0..3).find(|&r| leads(self.replicas[r].http)) else {
                return Ok(None);
            };
            let s = self.replicas[l].get_json("/v1/status")?;
            let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
            let ok = ids.iter().all(|id| {
                nodes.iter().any(|n| {
                    n["id"]
                        .as_str()
                        .is_some_and(|x| x.split('@').next() == Some(id))
                        && n["connected"] == true
                        && n["state"]["ecds"] == "current"
                })
            });
            Ok(ok.then_some(()))
        })
    }

    fn replica_up(&mut self, r: usize) -> bool {
        self.replicas[r].pid().is_some()
    }

    fn apply(&mut self, f: Fault) -> Result<()> {
        if let Fault::ReplicaKill(r) | Fault::ReplicaPause(r) = f
            && !self.replica_up(r)
        {
            self.note(format!("{f}: r{r} is not running (did not start again)"));
            return Ok(());
        }
        match f {
            Fault::ReplicaKill(r) => {
                self.replicas[r].signal(libc::SIGKILL)?;
                let cp = &mut self.replicas[r];
                wait_until(Duration::from_secs(5), "the killed replica to exit", || {
                    Ok(cp.pid().is_none().then_some(()))
                })?;
            }
            Fault::ReplicaPause(r) => self.replicas[r].signal(libc::SIGSTOP)?,
            Fault::ReplicaEtcdCut(r) => self.etcd_links[r].iter().for_each(Relay::cut),
            Fault::EnvoyXdsCut(s) => {
                if let Some(slot) = &self.slots[s] {
                    slot.relays.iter().for_each(Relay::cut);
                }
            }
            Fault::EtcdMemberKill(m) => self.etcd.kill(m),
            Fault::EnvoyRestart(s) => {
                if let Some(old) = self.slots[s].as_mut().and_then(|slot| slot.envoy.take()) {
                    self.keep_envoy_log(s, &old);
                }
                if let Some(slot) = self.slots[s].as_mut() {
                    let e = start_slot_envoy(s, &slot.relays)?;
                    if let Some(w) = &slot.writers {
                        w.retarget(e.listener_addr);
                    }
                    slot.envoy = Some(e);
                    slot.seen = None;
                }
            }
            Fault::DuplicateNodeId(s) => self.open_slot(s)?,
            Fault::DtableRestart(i) => self.cluster.servers[i].run_restart_hook()?,
        }
        Ok(())
    }

    fn heal(&mut self, f: Fault) -> Result<()> {
        match f {
            Fault::ReplicaKill(r) | Fault::ReplicaPause(r) if self.down.contains(&r) => {}
            Fault::ReplicaKill(r) => {
                if let Err(e) = self.replicas[r].start_again() {
                    // Not a check of the campaign: noted, and tried again at the end.
                    let first = format!("{e:#}")
                        .lines()
                        .last()
                        .unwrap_or_default()
                        .to_owned();
                    self.note(format!("r{r} did not start again: {first}"));
                    self.down.push(r);
                }
            }
            Fault::ReplicaPause(r) => self.replicas[r].signal(libc::SIGCONT)?,
            Fault::ReplicaEtcdCut(r) => self.etcd_links[r].iter().for_each(Relay::heal),
            Fault::EnvoyXdsCut(s) => {
                if let Some(slot) = &self.slots[s] {
                    slot.relays.iter().for_each(Relay::heal);
                }
            }
            Fault::EtcdMemberKill(m) => self.etcd.restart(m)?,
            Fault::DuplicateNodeId(s) => self.close_slot(s),
            Fault::EnvoyRestart(_) | Fault::DtableRestart(_) => {}
        }
        Ok(())
    }

    /// Reads each Envoy's applied map version; a version lower than one its process
    /// applied before is noted (evidence, not a check of its own).
    fn sample_versions(&mut self) -> Vec<String> {
        let mut went_back = Vec::new();
        for (s, slot) in self.slots.iter_mut().enumerate() {
            let Some(slot) = slot.as_mut() else { continue };
            let Some(e) = &slot.envoy else { continue };
            let Ok(Some(v)) = envoy_map_version(e) else {
                continue;
            };
            if let Some(prev) = slot.seen.filter(|&p| v < p) {
                went_back.push(format!(
                    "{}#{s} went back from map v{prev} to v{v}",
                    SLOTS[s].0
                ));
            }
            slot.seen = Some(slot.seen.map_or(v, |p| p.max(v)));
        }
        went_back
    }
}

fn start_slot_envoy(s: usize, relays: &[Relay]) -> Result<Envoy> {
    let (id, transport) = SLOTS[s];
    let others: Vec<String> = relays[1..].iter().map(|r| r.addr.to_string()).collect();
    let mut args = vec!["--kind", "edge", "--node-id", id];
    if transport == Transport::Rest {
        args.extend(["--xds", "rest", "--refresh-delay", "500ms"]);
    }
    for o in &others {
        args.extend(["--control-plane", o.as_str()]);
    }
    start_managed_envoy(&args, relays[0].addr, loopback(0))
        .with_context(|| format!("start Envoy {id}#{s}"))
}

// ---------------------------------------------------------------------------
// Running one schedule
// ---------------------------------------------------------------------------

/// A lost write: acknowledged through `slot`, by `server`, absent from storage.
#[derive(Debug, Clone)]
pub struct Lost {
    pub slot: usize,
    pub base: String,
    pub write_id: String,
    pub server: String,
}

/// What one schedule did and what the checker found.
#[derive(Debug)]
pub struct Report {
    pub schedule: Schedule,
    pub elapsed: Duration,
    pub faults: BTreeMap<FaultKind, usize>,
    /// Pushes by answer status (`0`: no answer).
    pub pushes: BTreeMap<u16, usize>,
    pub acknowledged: usize,
    pub unacknowledged: usize,
    pub lost: Vec<Lost>,
    pub double: Vec<DoubleService>,
    /// Rollout id → its final state (`done`, `rolled_back`), or the state it was
    /// still in at the bound.
    pub rollouts: BTreeMap<u64, String>,
    /// Rollouts not ended within [`ROLLOUT_BOUND`] after the heal.
    pub unended: Vec<u64>,
    /// Evidence: map versions going back, writers stuck after the heal, ...
    pub notes: Vec<String>,
    /// What happened when (ms since the start).
    pub timeline: Vec<String>,
}

impl Report {
    /// The checker: empty when the schedule passed.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.lost.is_empty() {
            let mut by: BTreeMap<(String, String), usize> = BTreeMap::new();
            for l in &self.lost {
                *by.entry((
                    SLOTS[l.slot].0.to_owned() + &format!("#{}", l.slot),
                    l.server.clone(),
                ))
                .or_default() += 1;
            }
            let detail: Vec<String> = by
                .iter()
                .map(|((slot, server), n)| format!("{n} via {slot} acked by {server}"))
                .collect();
            v.push(format!(
                "{} acknowledged writes lost ({})",
                self.lost.len(),
                detail.join(", ")
            ));
        }
        if let Some(d) = self.double.first() {
            let [a, b] = &d.holders;
            let bases: BTreeSet<&str> = self.double.iter().map(|d| d.base.as_str()).collect();
            v.push(format!(
                "{} bases loaded by two servers at once (first: {} by {} pid {} at {} ms and by \
                 {} pid {} at {} ms, before either restarted)",
                bases.len(),
                d.base,
                a.0,
                a.1,
                a.2,
                b.0,
                b.1,
                b.2
            ));
        }
        for id in &self.unended {
            v.push(format!(
                "rollout {id} still {} {} s after the heal",
                self.rollouts.get(id).map_or("unknown", String::as_str),
                ROLLOUT_BOUND.as_secs()
            ));
        }
        v
    }

    /// The per-schedule line.
    pub fn line(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{}×{n}", k.name()))
            .collect();
        let ended = self.rollouts.len() - self.unended.len();
        let v = self.violations();
        format!(
            "seed {} guards={} [{}] pushes {:?} acked {} lost {} double {} rollouts {}/{} ended in {:.0} s: {}",
            self.schedule.seed,
            self.schedule.guards,
            faults.join(" "),
            self.pushes,
            self.acknowledged,
            self.lost.len(),
            self.double.len(),
            ended,
            self.rollouts.len(),
            self.elapsed.as_secs_f64(),
            if v.is_empty() {
                "PASS".to_owned()
            } else {
                format!("FAIL: {}", v.join("; "))
            }
        )
    }

    pub fn to_json(&self) -> Value {
        let faults: BTreeMap<&str, usize> =
            self.faults.iter().map(|(k, n)| (k.name(), *n)).collect();
        let pushes: BTreeMap<String, usize> = self
            .pushes
            .iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect();
        json!({
            "seed": self.schedule.seed,
            "guards": self.schedule.guards,
            "schedule": self.schedule.describe(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "faults": faults,
            "pushes": pushes,
            "acknowledged": self.acknowledged,
            "unacknowledged": self.unacknowledged,
            "lost": self.lost.len(),
            "lost_sample": self.lost.iter().take(20).map(|l| json!({
                "slot": format!("{}#{}", SLOTS[l.slot].0, l.slot), "base": l.base,
                "write_id": l.write_id, "server": l.server, "moved_base": moved(&l.base),
            })).collect::<Vec<_>>(),
            "double_service": self.double.iter().map(|d| json!({
                "base": d.base,
                "holders": d.holders.iter().map(|h| json!({"server": h.0, "pid": h.1, "from": h.2}))
                    .collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "rollouts": self.rollouts.iter().map(|(id, s)| (id.to_string(), json!(s)))
                .collect::<serde_json::Map<_, _>>(),
            "rollouts_unended": self.unended,
            "violations": self.violations(),
            "notes": self.notes,
            "timeline": self.timeline,
        })
    }
}

/// Runs `schedule` on a fresh topology and checks the outcome. An `Err` is a harness
/// failure (a process that would not start), not a finding.
pub fn run(schedule: &Schedule) -> Result<Report> {
    let began = Instant::now();
    let mut w = World::start(schedule.guards)?;
    w.began = began;
    w.note("topology up, every Envoy current".into());
    let mut pushes: BTreeMap<u16, usize> = BTreeMap::new();
    let mut rollout_ids: BTreeSet<u64> = BTreeSet::new();
    let mut notes = Vec::new();
    let mut active: Vec<(Fault, usize)> = Vec::new();
    for (i, step) in schedule.steps.iter().enumerate() {
        if let Some(f) = step.fault {
            w.note(format!("step {i}: {f}"));
            w.apply(f).with_context(|| format!("step {i}: apply {f}"))?;
            if f.lasts() {
                active.push((f, step.heal_at));
            }
        }
        std::thread::sleep(Duration::from_millis(step.millis / 2));
        if let Some(r) = step.push {
            let (status, id) = push_other_map(&mut w, r);
            *pushes.entry(status).or_default() += 1;
            rollout_ids.extend(id);
        }
        std::thread::sleep(Duration::from_millis(step.millis / 2));
        notes.extend(w.sample_versions());
        let (heal, keep): (Vec<_>, Vec<_>) = active.into_iter().partition(|&(_, h)| h <= i);
        active = keep;
        for (f, _) in heal {
            w.note(format!("step {i}: heal {f}"));
            w.heal(f).with_context(|| format!("step {i}: heal {f}"))?;
        }
    }
    for (f, _) in std::mem::take(&mut active) {
        w.note(format!("end: heal {f}"));
        w.heal(f).with_context(|| format!("heal {f}"))?;
    }
    for r in std::mem::take(&mut w.down) {
        notes.push(format!("r{r} did not start again while faults lasted"));
        w.etcd.wait_healthy(Duration::from_secs(30))?;
        w.replicas[r]
            .start_again()
            .with_context(|| format!("start r{r} after the heal"))?;
        w.note(format!("end: r{r} started again"));
    }
    let healed = Instant::now();
    w.note("every fault healed".into());

    // Every rollout ends within the bound.
    let mut rollouts: BTreeMap<u64, String> = BTreeMap::new();
    let mut unended = Vec::new();
    let deadline = healed + ROLLOUT_BOUND;
    let listed = wait_until(
        Duration::from_secs(20),
        "a replica to list rollouts",
        || {
            Ok(w.replicas
                .iter()
                .find_map(|cp| crate::replicas::rollout_ids(cp).ok()))
        },
    )
    .unwrap_or_default();
    rollout_ids.extend(listed);
    for &id in &rollout_ids {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut last = String::from("unknown");
        let ended = wait_until(left.max(Duration::from_millis(100)), "rollout end", || {
            for cp in &w.replicas {
                let Ok(r) = cp.get_json(&format!("/v1/rollouts/{id}")) else {
                    continue;
                };
                if let Some(s) = r["state"].as_str() {
                    last = s.to_owned();
                    if matches!(s, "done" | "rolled_back") {
                        return Ok(Some(()));
                    }
                }
            }
            Ok(None)
        });
        if ended.is_err() {
            unended.push(id);
        }
        w.note(format!("rollout {id}: {last}"));
        rollouts.insert(id, last);
    }
    notes.extend(w.sample_versions());

    // Writers go on after the heal (a note when they do not: not one of the checks).
    for (s, slot) in w.slots.iter().enumerate() {
        let Some(wr) = slot.as_ref().and_then(|slot| slot.writers.as_ref()) else {
            continue;
        };
        if let Err(e) = wr.wait_for_more(30, Duration::from_secs(20)) {
            notes.push(format!(
                "{}#{s}: writers stuck after the heal: {e:#}",
                SLOTS[s].0
            ));
        }
    }
    for s in 0..SLOTS.len() {
        w.close_slot(s);
    }
    w.cluster.stop_all()?;
    let mut lost = Vec::new();
    let (mut acknowledged, mut unacknowledged) = (0, 0);
    for (&s, log) in &w.logs {
        acknowledged += log.acked.len();
        unacknowledged += log.failed;
        let missing: BTreeSet<(String, String)> = w
            .cluster
            .missing(&log.acknowledged())?
            .into_iter()
            .collect();
        for (base, id, server) in &log.acked {
            if missing.contains(&(base.clone(), id.clone())) {
                lost.push(Lost {
                    slot: s,
                    base: base.clone(),
                    write_id: id.clone(),
                    server: server.clone(),
                });
            }
        }
    }
    let double = double_service(&w.cluster.events()?);
    if !lost.is_empty() || !double.is_empty() || !unended.is_empty() {
        let dir = std::env::temp_dir().join(format!(
            "seashard-campaign-{}-seed{}",
            std::process::id(),
            schedule.seed
        ));
        match w.save_evidence(&dir) {
            Ok(()) => notes.push(format!("logs of every process: {}", dir.display())),
            Err(e) => notes.push(format!("logs not saved in {}: {e:#}", dir.display())),
        }
    }
    w.guards.clear();
    Ok(Report {
        schedule: schedule.clone(),
        elapsed: began.elapsed(),
        faults: schedule.counts(),
        pushes,
        acknowledged,
        unacknowledged,
        lost,
        double,
        rollouts,
        unended,
        notes,
        timeline: std::mem::take(&mut w.timeline),
    })
}

/// Pushes the map the active one is not, through replica `first` or the next one that
/// runs and is not paused; the answer's status (`0` when none answered) and the
/// rollout id of a `202`.
fn push_other_map(w: &mut World, first: usize) -> (u16, Option<u64>) {
    for k in 0..3 {
        let r = (first + k) % 3;
        if !w.replica_up(r) || is_stopped(&mut w.replicas[r]) {
            continue;
        }
        // The active map as any replica answers it (this one may be cut off).
        let active = (0..3).map(|k| (r + k) % 3).find_map(|i| {
            w.replicas[i]
                .get_json("/v1/map")
                .ok()
                .filter(|v| v["map"].is_object())
        });
        let current_new = match active {
            Some(v) => v["map"].to_string().contains("\"4-f\""),
            None => w.pushed_new,
        };
        let cp = &w.replicas[r];
        let map = if current_new { old_map() } else { new_map() };
        let (status, body) = match cp.post("/v1/maps", &json!({"map": map, "comment": "campaign"}))
        {
            Ok(a) => a,
            Err(_) => (0, Value::Null),
        };
        let id = body["rollout"].as_u64();
        if status == 202 {
            w.pushed_new = !current_new;
        }
        w.note(format!(
            "push {} via r{r}: {status} {}",
            if current_new { "old map" } else { "new map" },
            body.to_string().chars().take(160).collect::<String>()
        ));
        return (status, id);
    }
    w.note("push: no replica to push through".into());
    (0, None)
}

/// Whether the process is stopped (SIGSTOP), from `/proc/PID/stat`.
fn is_stopped(cp: &mut ControlPlaneProcess) -> bool {
    cp.pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .and_then(|stat| {
            let i = stat.rfind(')')?;
            stat[i + 1..].split_whitespace().next().map(|s| s == "T")
        })
        .unwrap_or(false)
}

/// Totals over several reports, and the results file's content.
pub fn summary(reports: &[Report], errors: &[(u64, String)]) -> (String, Value) {
    let mut faults: BTreeMap<&str, usize> = FaultKind::ALL.iter().map(|k| (k.name(), 0)).collect();
    let (mut acked, mut lost, mut double, mut rollouts, mut ended) = (0, 0, 0, 0, 0);
    let mut pushes: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = Vec::new();
    for r in reports {
        for (k, n) in &r.faults {
            *faults.entry(k.name()).or_default() += n;
        }
        for (s, n) in &r.pushes {
            *pushes.entry(s.to_string()).or_default() += n;
        }
        acked += r.acknowledged;
        lost += r.lost.len();
        double += r.double.len();
        rollouts += r.rollouts.len();
        ended += r.rollouts.len() - r.unended.len();
        if !r.violations().is_empty() {
            failed.push(r.schedule.seed);
        }
    }
    let text = format!(
        "{} schedules ({} failed: {failed:?}; {} harness errors: {:?}), faults {faults:?}, \
         pushes {pushes:?}, {acked} writes acknowledged, {lost} lost, {double} bases served \
         twice, {ended}/{rollouts} rollouts ended",
        reports.len(),
        failed.len(),
        errors.len(),
        errors.iter().map(|(s, _)| s).collect::<Vec<_>>(),
    );
    let v = json!({
        "schedules": reports.len(),
        "failed_seeds": failed,
        "harness_errors": errors.iter().map(|(s, e)| json!({"seed": s, "error": e})).collect::<Vec<_>>(),
        "faults": faults,
        "pushes": pushes,
        "acknowledged": acked,
        "lost": lost,
        "double_service": double,
        "rollouts": rollouts,
        "rollouts_ended": ended,
        "runs": reports.iter().map(Report::to_json).collect::<Vec<_>>(),
    });
    (text, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_schedule_and_seeds_differ() {
        let a = Schedule::generate(7, false, 10, &FaultKind::ALL);
        assert_eq!(a, Schedule::generate(7, false, 10, &FaultKind::ALL));
        assert_ne!(a, Schedule::generate(8, false, 10, &FaultKind::ALL));
    }

    #[test]
    fn schedules_respect_their_limits_and_cover_every_kind() {
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            let s = Schedule::generate(seed, false, 10, &FaultKind::ALL);
            let mut active: Vec<(Fault, usize)> = Vec::new();
            for (i, st) in s.steps.iter().enumerate() {
                active.retain(|&(_, h)| h >= i);
                if let Some(f) = st.fault {
                    seen.insert(f.kind());
                    assert!(active.len() < MAX_ACTIVE, "seed {seed}: {}", s.describe());
                    if f.lasts() {
                        active.push((f, st.heal_at));
                    }
                }
                let members_down = active
                    .iter()
                    .filter(|(f, _)| matches!(f, Fault::EtcdMemberKill(_)))
                    .count();
                assert!(members_down <= 1, "seed {seed}: {}", s.describe());
            }
        }
        assert_eq!(seen.len(), FaultKind::ALL.len());
        let only = Schedule::generate(3, false, 10, &[FaultKind::ReplicaEtcdCut]);
        assert!(
            only.counts()
                .keys()
                .all(|k| *k == FaultKind::ReplicaEtcdCut)
        );
    }
}
