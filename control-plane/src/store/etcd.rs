//! The store of several control plane replicas: etcd (`[store] kind = "etcd"`).
//!
//! ```text
//! {prefix}/leader                  LeaderInfo, on the leader's lease (the election)
//! {prefix}/replicas/{replica}      LeaderInfo, on each replica's lease (who is alive)
//! {prefix}/active                  the active version number
//! {prefix}/versions/{n:020}        Version
//! {prefix}/audit/{ms:020}-{replica}-{seq}   AuditEntry (its id: the create revision)
//! {prefix}/rollout_seq             the last rollout id
//! {prefix}/rollout_unfinished      the id of the rollout not finished, if any
//! {prefix}/rollouts/{id:020}       StoredRollout
//! {prefix}/aborts/{id:020}         why an abort was asked for
//! {prefix}/servers/{name}          ServerState
//! {prefix}/nodes/{replica}/{instance}   NodeRecord, written by the replica holding the stream
//! ```
//!
//! **Election.** Each replica holds one lease (`lease_ttl`), kept alive every third
//! of it, and campaigns by creating `leader` on it in a transaction that succeeds
//! only if the key does not exist. The winner's **term** is the key's create
//! revision. Every leader write is a transaction conditioned on
//! `create_revision(leader) == term`: once the lease expired (the leader died, was
//! paused, or lost etcd), the key is gone or re-created by another replica with a
//! higher revision, and the deposed leader's writes fail, however late they come.
//! The others watch `leader` and campaign when it is deleted.
//!
//! **Watches.** Every replica watches `active` (a new version: its Envoys get it) and
//! `nodes/` with `replicas/` (the leader counts every Envoy's ACK, whichever replica
//! holds its stream; a record of a dead replica stands for an Envoy last seen there).
//!
//! **Currency.** A replica hands Envoys maps only while it can show it is current
//! ([`Currency`]): every quarter of `lease_ttl` it reads `active` (linearizable,
//! from a member with a leader) while its lease is held, and takes a newer number
//! than its watch delivered (a watch behind catches up). With no successful read
//! for half of `lease_ttl`, or the lease lost, it is not current: within the
//! lease's lifetime, before the other replicas stop counting its Envoys.
//!
//! The client runs on a runtime of its own, on its own thread: the [`Store`] calls
//! are synchronous (as SQLite's), and each waits at most `[store] timeout`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::{
    AuditEntry, Currency, FinishRollout, LeaderInfo, Leadership, NewAudit, NewVersion, NodeRecord,
    RemoteNode, ServerState, Store, StoreError, StoreInfo, StoredRollout, Version, now_ms,
};
use crate::config::{Config, StoreConfig};

/// At most this many operations in one transaction (etcd's default `--max-txn-ops`
/// is 128).
const MAX_TXN_OPS: usize = 100;
/// How long a replica waits before campaigning again after an error.
const RETRY: Duration = Duration::from_millis(500);

/// The etcd store. See the module documentation.
pub struct EtcdStore {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    /// Ends the client's runtime thread when the store is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// What the store's calls and its background tasks share.
struct Shared {
    client: Client,
    prefix: String,
    replica: String,
    endpoints: Vec<String>,
    /// How this replica announces itself; its API URL is set by `advertise`.
    info: Mutex<LeaderInfo>,
    /// True once the API listens: campaigning waits for it (`seactl serve --check`
    /// never campaigns).
    advertised: watch::Sender<bool>,
    /// `[store] advertise` is set: it wins over the listening address.
    configured_api: bool,
    lease_ttl: Duration,
    timeout: Duration,
    /// The term while this replica leads.
    term: Mutex<Option<i64>>,
    leadership: watch::Sender<Leadership>,
    active: watch::Sender<u64>,
    nodes: watch::Sender<Arc<Vec<RemoteNode>>>,
    currency: watch::Sender<Currency>,
    audit_seq: AtomicU64,
}

fn etcd_error(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => StoreError::Unavailable(e.to_string()),
        E::GRpcStatus(ref s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    // The client's own request timeout (`Timeout expired`).
                    | tonic::Code::Cancelled
            ) || s.message().contains("no leader") =>
        {
            StoreError::Unavailable(s.message().to_owned())
        }
        e => StoreError::Etcd(e.to_string()),
    }
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{key}: {e}"))
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(|e| corrupt(&String::from_utf8_lossy(kv.key()), e))
}

fn encode<T: Serialize>(v: &T) -> String {
    // Records are plain data: they always serialize.
    serde_json::to_string(v).unwrap_or_default()
}

impl Shared {
    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    fn lock_info(&self) -> std::sync::MutexGuard<'_, LeaderInfo> {
        self.info
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn leader_key(&self) -> String {
        self.key("leader")
    }

    /// This replica's term, or `NotLeader` naming the leader it knows.
    fn term(&self) -> Result<i64, StoreError> {
        let term = *self
            .term
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        term.ok_or_else(|| StoreError::NotLeader(self.known_leader()))
    }

    fn known_leader(&self) -> Option<String> {
        match &*self.leadership.borrow() {
            Leadership::Follower {
                leader: Some(l), ..
            } => Some(l.replica.clone()),
            _ => None,
        }
    }

    fn set_term(&self, term: Option<i64>) {
        *self
            .term
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = term;
    }

    /// The fencing condition of a leader write.
    fn fence(&self) -> Result<Compare, StoreError> {
        Ok(Compare::create_revision(
            self.leader_key(),
            CompareOp::Equal,
            self.term()?,
        ))
    }

    async fn get(&self, key: String) -> Result<Option<KeyValue>, StoreError> {
        let mut r = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(etcd_error)?;
        Ok(r.take_kvs().into_iter().next())
    }

    /// The newest `limit` keys under `dir/` (0: all), newest (highest key) first.
    async fn newest(&self, dir: &str, limit: u32) -> Result<Vec<KeyValue>, StoreError> {
        let mut opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend);
        if limit > 0 {
            opts = opts.with_limit(i64::from(limit));
        }
        let mut r = self
            .client
            .kv_client()
            .get(self.key(&format!("{dir}/")), Some(opts))
            .await
            .map_err(etcd_error)?;
        Ok(r.take_kvs())
    }

    /// Marks this replica's node records disconnected (it holds no stream yet).
    async fn disconnect_own_nodes(&self) -> Result<(), StoreError> {
        let kvs = self.newest(&format!("nodes/{}", self.replica), 0).await?;
        let mut puts = Vec::new();
        for kv in &kvs {
            let mut n: NodeRecord = decode(kv)?;
            if n.connected_since.take().is_some() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                puts.push(TxnOp::put(key, encode(&n), None));
            }
        }
        self.unconditional(puts).await
    }

    /// Runs `ops` (no condition), in transactions of at most [`MAX_TXN_OPS`].
    async fn unconditional(&self, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let chunk: Vec<TxnOp> = ops.by_ref().take(MAX_TXN_OPS).collect();
            self.client
                .kv_client()
                .txn(Txn::new().and_then(chunk))
                .await
                .map_err(etcd_error)?;
        }
        Ok(())
    }

    /// The active version number (0 in a new store).
    async fn active_now(&self) -> Result<u64, StoreError> {
        match self.get(self.key("active")).await? {
            Some(kv) => parse_u64(&kv),
            None => Ok(0),
        }
    }

    /// A leader write with no condition of its own.
    async fn leader_write(&self, then: Vec<TxnOp>) -> Result<(), StoreError> {
        self.leader_txn(Vec::new(), then, || {
            StoreError::Etcd("etcd refused an unconditional write".into())
        })
        .await
    }

    /// Runs a leader write; a refused condition is told apart: not the leader any
    /// more (the fence), or `other` (the caller's own condition).
    async fn leader_txn(
        &self,
        mut when: Vec<Compare>,
        then: Vec<TxnOp>,
        other: impl FnOnce() -> StoreError,
    ) -> Result<(), StoreError> {
        when.insert(0, self.fence()?);
        let txn = Txn::new()
            .when(when)
            .and_then(then)
            .or_else(vec![TxnOp::get(self.leader_key(), None)]);
        let r = self.client.kv_client().txn(txn).await.map_err(etcd_error)?;
        if r.succeeded() {
            return Ok(());
        }
        let term = self.term()?;
        let leader_now = first_got(&r);
        match leader_now {
            Some(kv) if kv.create_revision() == term => Err(other()),
            kv => {
                self.set_term(None);
                let leader = kv
                    .and_then(|kv| decode::<LeaderInfo>(&kv).ok())
                    .map(|l| l.replica);
                tracing::warn!(
                    term,
                    leader = leader.as_deref().unwrap_or("none"),
                    "a leader write was refused: this replica is no longer the leader"
                );
                Err(StoreError::NotLeader(leader))
            }
        }
    }
}

impl EtcdStore {
    /// Connects to `[store]`'s etcd, and starts this replica's lease, campaign and
    /// watches. Fails when no member answers within `[store] timeout`.
    pub fn connect(config: &Config) -> Result<EtcdStore, StoreError> {
        let sc = &config.store;
        let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("seashard-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
            })
            .map_err(|e| StoreError::Etcd(format!("cannot start the etcd client thread: {e}")))?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| StoreError::Etcd("the etcd client thread ended".into()))?
            .map_err(StoreError::Etcd)?;
        let options = connect_options(sc)?;
        let endpoints = sc.endpoints.clone();
        let timeout = sc.timeout;
        let client = block(&runtime, timeout, async move {
            Client::connect(endpoints, Some(options))
                .await
                .map_err(etcd_error)
        })?;
        let replica = replica_name(config);
        let info = LeaderInfo {
            replica: replica.clone(),
            // Else the listening address, from `advertise`; nothing is announced
            // before it (campaigning waits for it).
            api: sc.advertise.clone().unwrap_or_default(),
            host: hostname(),
            pid: std::process::id(),
        };
        let shared = Arc::new(Shared {
            client,
            prefix: sc.prefix.clone(),
            replica,
            endpoints: sc.endpoints.clone(),
            info: Mutex::new(info),
            advertised: watch::channel(false).0,
            configured_api: sc.advertise.is_some(),
            lease_ttl: sc.lease_ttl,
            timeout,
            term: Mutex::new(None),
            leadership: watch::channel(Leadership::Follower { leader: None }).0,
            active: watch::channel(0).0,
            nodes: watch::channel(Arc::new(Vec::new())).0,
            currency: watch::channel(Currency::Unknown {
                reason: "not yet read from etcd".into(),
            })
            .0,
            audit_seq: AtomicU64::new(0),
        });
        // The first read proves the cluster answers (and has a majority).
        let s = shared.clone();
        let active = block(
            &runtime,
            timeout,
            async move { s.get(s.key("active")).await },
        )?;
        let first = active.as_ref().map(parse_u64).transpose()?.unwrap_or(0);
        shared.active.send_replace(first);
        shared
            .currency
            .send_replace(Currency::Current { active: first });
        // Before this replica is announced alive again: the node records an earlier
        // run of it left (killed, it could not mark them disconnected) hold no stream.
        // Else the other replicas count them as connected, and an Envoy now on
        // another replica as held twice (a node id conflict: every rollout refused).
        let s = shared.clone();
        block(
            &runtime,
            timeout,
            async move { s.disconnect_own_nodes().await },
        )?;
        runtime.spawn(watch_members(shared.clone()));
        runtime.spawn(campaign(shared.clone()));
        runtime.spawn(keep_following(
            shared.clone(),
            "the active version",
            follow_active,
        ));
        runtime.spawn(keep_following(shared.clone(), "node records", follow_nodes));
        runtime.spawn(keep_current(shared.clone()));
        Ok(EtcdStore {
            shared,
            runtime,
            _stop: stop_tx,
        })
    }

    /// Runs `f` on the client's runtime and waits for it, at most `[store] timeout`.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        block(&self.runtime, self.shared.timeout, f(self.shared.clone()))
    }

    /// Gives up leadership now (the lease is revoked: another replica takes over at
    /// once). For a clean shutdown.
    pub fn resign(&self) {
        let _ = self.call(|s| async move {
            s.set_term(None);
            let mut r = s
                .client
                .kv_client()
                .get(s.leader_key(), None)
                .await
                .map_err(etcd_error)?;
            if let Some(kv) = r.take_kvs().into_iter().next()
                && decode::<LeaderInfo>(&kv).is_ok_and(|l| l.replica == s.replica)
                && kv.lease() != 0
            {
                s.client
                    .lease_client()
                    .revoke(kv.lease())
                    .await
                    .map_err(etcd_error)?;
            }
            Ok(())
        });
    }
}

/// Waits on the current thread for `fut`, run on `runtime`, at most `timeout`.
fn block<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    timeout: Duration,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let r = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {timeout:?} (is a majority of the etcd members up?)"
            ))),
        };
        let _ = tx.send(r);
    });
    rx.recv()
        .map_err(|_| StoreError::Unavailable("the etcd client stopped".into()))?
}

fn connect_options(sc: &StoreConfig) -> Result<ConnectOptions, StoreError> {
    let mut o = ConnectOptions::new()
        .with_connect_timeout(sc.timeout)
        .with_timeout(sc.timeout)
        .with_keep_alive(Duration::from_secs(2), sc.timeout)
        // A member cut off from the majority refuses at once instead of stalling.
        .with_require_leader(true);
    if let Some(user) = &sc.username {
        let password = sc
            .etcd_password()
            .map_err(|e| StoreError::Etcd(e.to_string()))?
            .unwrap_or_default();
        o = o.with_user(user.clone(), password);
    }
    if let Some(t) = &sc.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                StoreError::Etcd(format!("store.tls: cannot read {}: {e}", p.display()))
            })
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?));
        if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        o = o.with_tls(tls);
    }
    Ok(o)
}

/// `[store] replica`, else the host name and the API port.
fn replica_name(config: &Config) -> String {
    config
        .store
        .replica
        .clone()
        .unwrap_or_else(|| format!("{}:{}", hostname(), config.listen.http.port()))
}

/// This host's name, as `envoy-bootstrap` reads it.
pub(crate) fn hostname() -> String {
    crate::config::local_hostname().unwrap_or_else(|| "localhost".to_owned())
}

/// The first key a transaction's `get` found.
fn first_got(r: &etcd_client::TxnResponse) -> Option<KeyValue> {
    r.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(mut g) => g.take_kvs().into_iter().next(),
        _ => None,
    })
}

fn parse_u64(kv: &KeyValue) -> Result<u64, StoreError> {
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(&String::from_utf8_lossy(kv.key()), "not a number"))
}

/// The version key of `n`: zero-padded, so keys sort as numbers.
fn version_key(s: &Shared, n: u64) -> String {
    s.key(&format!("versions/{n:020}"))
}

fn rollout_key(s: &Shared, id: u64) -> String {
    s.key(&format!("rollouts/{id:020}"))
}

fn abort_key(s: &Shared, id: u64) -> String {
    s.key(&format!("aborts/{id:020}"))
}

fn audit_op(s: &Shared, entry: &AuditEntry) -> TxnOp {
    let seq = s.audit_seq.fetch_add(1, Ordering::Relaxed);
    TxnOp::put(
        s.key(&format!(
            "audit/{:020}-{}-{seq:08}",
            entry.at.max(0),
            s.replica
        )),
        encode(entry),
        None,
    )
}

/// How often each member's client port is probed.
const PROBE_EVERY: Duration = Duration::from_millis(300);

/// Keeps requests off members that do not accept connections: the client balances
/// over every endpoint and would otherwise keep sending a share of requests to a
/// dead member, failing each. A member is taken out when its client port refuses
/// connections (while another one accepts them) and put back when it accepts
/// them again.
async fn watch_members(s: Arc<Shared>) {
    let mut out: Vec<String> = Vec::new();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let mut alive = Vec::with_capacity(s.endpoints.len());
        for e in &s.endpoints {
            alive.push(accepts(e).await);
        }
        if !alive.iter().any(|a| *a) {
            continue;
        }
        for (e, up) in s.endpoints.iter().zip(alive) {
            let was_out = out.contains(e);
            if !up && !was_out && s.client.remove_endpoint(e).await.is_ok() {
                tracing::warn!(endpoint = %e, "etcd member unreachable: not used until it is back");
                out.push(e.clone());
            } else if up && was_out && s.client.add_endpoint(e).await.is_ok() {
                tracing::info!(endpoint = %e, "etcd member reachable again");
                out.retain(|o| o != e);
            }
        }
    }
}

/// Whether the member at `endpoint` (`http(s)://HOST:PORT`) accepts a connection.
async fn accepts(endpoint: &str) -> bool {
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/');
    matches!(
        tokio::time::timeout(PROBE_EVERY, tokio::net::TcpStream::connect(authority)).await,
        Ok(Ok(_))
    )
}

/// Campaigns for leadership for as long as the store lives: one lease per round,
/// kept alive; leads while the lease holds, follows (watching the leader key)
/// otherwise.
async fn campaign(s: Arc<Shared>) {
    // Not before the API listens: the leader must be reachable.
    let _ = s.advertised.subscribe().wait_for(|known| *known).await;
    loop {
        let why = match term(&s).await {
            Ok(()) => "the lease ended".to_owned(),
            Err(e) => e.to_string(),
        };
        s.set_term(None);
        s.leadership.send_replace(Leadership::Unavailable {
            reason: why.clone(),
        });
        tracing::warn!(replica = %s.replica, reason = %why, "no leadership; campaigning again");
        tokio::time::sleep(RETRY).await;
    }
}

/// One round: a lease, this replica's membership, and the campaign, until the
/// lease is lost.
async fn term(s: &Arc<Shared>) -> Result<(), StoreError> {
    let ttl = s.lease_ttl.as_secs().max(1) as i64;
    let mut client = s.client.clone();
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(etcd_error)?
        .id();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.map_err(etcd_error)?;
    let info = encode(&*s.lock_info());
    client
        .put(
            s.key(&format!("replicas/{}", s.replica)),
            info.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(etcd_error)?;
    let every = s.lease_ttl / 3;
    let keep_alive = async {
        loop {
            tokio::time::sleep(every).await;
            keeper.keep_alive().await.map_err(etcd_error)?;
            match tokio::time::timeout(every, answers.message()).await {
                Ok(Ok(Some(a))) if a.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return Err(StoreError::Unavailable("the lease expired".into())),
                Ok(Ok(None)) => {
                    return Err(StoreError::Unavailable("the lease stream ended".into()));
                }
                Ok(Err(e)) => return Err(etcd_error(e)),
                Err(_) => {
                    // No answer in time: the lease may expire before the next one.
                    // Stop leader writes now; the fence would refuse them anyway.
                    return Err(StoreError::Unavailable(format!(
                        "no keep-alive answer within {every:?}"
                    )));
                }
            }
        }
    };
    let lead = async {
        loop {
            let txn = Txn::new()
                .when(vec![Compare::create_revision(
                    s.leader_key(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![TxnOp::put(
                    s.leader_key(),
                    info.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else(vec![TxnOp::get(s.leader_key(), None)]);
            let r = client.txn(txn).await.map_err(etcd_error)?;
            let revision = r.header().map(|h| h.revision()).unwrap_or(0);
            let (term, watch_from) = if r.succeeded() {
                s.set_term(Some(revision));
                s.leadership
                    .send_replace(Leadership::Leader { term: revision });
                tracing::info!(replica = %s.replica, term = revision, "elected leader");
                (Some(revision), revision + 1)
            } else {
                let kv = first_got(&r);
                let leader = kv.as_ref().and_then(|kv| decode::<LeaderInfo>(kv).ok());
                s.leadership.send_replace(Leadership::Follower { leader });
                (None, revision + 1)
            };
            // Wait until the leader key is deleted (its lease ended, or it resigned).
            let mut stream = client
                .watch(
                    s.leader_key(),
                    Some(WatchOptions::new().with_start_revision(watch_from)),
                )
                .await
                .map_err(etcd_error)?;
            'watch: loop {
                match stream.message().await.map_err(etcd_error)? {
                    Some(w) if w.canceled() => {
                        return Err(StoreError::Etcd(format!(
                            "the leader watch was cancelled: {}",
                            w.cancel_reason()
                        )));
                    }
                    Some(w) => {
                        if w.events()
                            .iter()
                            .any(|e| e.event_type() == EventType::Delete)
                        {
                            break 'watch;
                        }
                    }
                    None => return Err(StoreError::Unavailable("the leader watch ended".into())),
                }
            }
            if term.is_some() {
                s.set_term(None);
                return Err::<(), _>(StoreError::NotLeader(None));
            }
        }
    };
    let result = tokio::select! {
        r = keep_alive => r,
        r = lead => r,
    };
    s.set_term(None);
    // Best effort: another replica need not wait for the lease to run out.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
    result
}

/// Keeps [`Shared::currency`]: see the module documentation.
async fn keep_current(s: Arc<Shared>) {
    let every = (s.lease_ttl / 4).max(Duration::from_millis(100));
    let stale_after = s.lease_ttl / 2;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let session = match &*s.leadership.borrow() {
            Leadership::Unavailable { reason } => Err(format!("no etcd session: {reason}")),
            _ => Ok(()),
        };
        let read = match session {
            Err(why) => Err(why),
            Ok(()) => match tokio::time::timeout(every, s.get(s.key("active"))).await {
                Ok(Ok(kv)) => kv
                    .as_ref()
                    .map(parse_u64)
                    .transpose()
                    .map(Option::unwrap_or_default)
                    .map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("etcd did not answer a read within {every:?}")),
            },
        };
        match read {
            Ok(active) => {
                last_ok = tokio::time::Instant::now();
                // A watch behind (or broken) catches up here.
                s.active
                    .send_if_modified(|v| active > *v && replace(v, Ok(active)));
                let now = Currency::Current { active };
                s.currency.send_if_modified(|c| {
                    let changed = *c != now;
                    if matches!(c, Currency::Unknown { .. }) {
                        tracing::info!(active, "current again: etcd answers");
                    }
                    *c = now;
                    changed
                });
            }
            Err(why) if last_ok.elapsed() >= stale_after || why.starts_with("no etcd") => {
                s.currency.send_if_modified(|c| {
                    if matches!(c, Currency::Current { .. }) {
                        tracing::warn!(reason = %why, "not current: this replica hands no map to an Envoy until etcd answers again");
                    }
                    let next = Currency::Unknown { reason: why };
                    let changed = *c != next;
                    *c = next;
                    changed
                });
            }
            Err(_) => {}
        }
    }
}

/// Runs `follow` (a read, then a watch from the next revision) again after every
/// error, for as long as the store lives.
async fn keep_following<F, Fut>(s: Arc<Shared>, what: &'static str, follow: F)
where
    F: Fn(Arc<Shared>) -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    loop {
        if let Err(e) = follow(s.clone()).await {
            tracing::warn!(error = %e, "the watch of {what} ended; watching again");
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Keeps `active` current.
async fn follow_active(s: Arc<Shared>) -> Result<(), StoreError> {
    let s = s.as_ref();
    let mut client = s.client.clone();
    let mut r = client
        .get(s.key("active"), None)
        .await
        .map_err(etcd_error)?;
    let revision = r.header().map(|h| h.revision()).unwrap_or(0);
    if let Some(kv) = r.take_kvs().into_iter().next() {
        s.active.send_if_modified(|v| replace(v, parse_u64(&kv)));
    }
    let mut stream = client
        .watch(
            s.key("active"),
            Some(WatchOptions::new().with_start_revision(revision + 1)),
        )
        .await
        .map_err(etcd_error)?;
    while let Some(w) = stream.message().await.map_err(etcd_error)? {
        if w.canceled() {
            return Err(StoreError::Etcd(w.cancel_reason().to_owned()));
        }
        for e in w.events() {
            if let (EventType::Put, Some(kv)) = (e.event_type(), e.kv()) {
                s.active.send_if_modified(|v| replace(v, parse_u64(kv)));
            }
        }
    }
    Err(StoreError::Unavailable("the watch stream ended".into()))
}

fn replace(v: &mut u64, new: Result<u64, StoreError>) -> bool {
    match new {
        Ok(n) if n != *v => {
            *v = n;
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::error!(error = %e, "a corrupt active version");
            false
        }
    }
}

/// Keeps the other replicas' node records current, with whether each replica is
/// alive.
async fn follow_nodes(s: Arc<Shared>) -> Result<(), StoreError> {
    let s = s.as_ref();
    let mut client = s.client.clone();
    let nodes_dir = s.key("nodes/");
    let replicas_dir = s.key("replicas/");
    // One read of both at one revision, then one watch stream for both.
    let txn = Txn::new().and_then(vec![
        TxnOp::get(nodes_dir.clone(), Some(GetOptions::new().with_prefix())),
        TxnOp::get(replicas_dir.clone(), Some(GetOptions::new().with_prefix())),
    ]);
    let r = client.txn(txn).await.map_err(etcd_error)?;
    let revision = r.header().map(|h| h.revision()).unwrap_or(0);
    let mut records: BTreeMap<String, (String, NodeRecord)> = BTreeMap::new();
    let mut live: BTreeSet<String> = BTreeSet::new();
    for op in r.op_responses() {
        if let TxnOpResponse::Get(g) = op {
            for kv in g.kvs() {
                apply(s, &mut records, &mut live, kv, true);
            }
        }
    }
    publish_nodes(s, &records, &live);
    let after = || {
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1),
        )
    };
    let mut stream = client.watch(nodes_dir, after()).await.map_err(etcd_error)?;
    stream
        .watch(replicas_dir, after())
        .await
        .map_err(etcd_error)?;
    while let Some(w) = stream.message().await.map_err(etcd_error)? {
        if w.canceled() {
            return Err(StoreError::Etcd(w.cancel_reason().to_owned()));
        }
        let mut changed = false;
        for e in w.events() {
            if let Some(kv) = e.kv() {
                changed |= apply(
                    s,
                    &mut records,
                    &mut live,
                    kv,
                    e.event_type() == EventType::Put,
                );
            }
        }
        if changed {
            publish_nodes(s, &records, &live);
        }
    }
    Err(StoreError::Unavailable("the watch stream ended".into()))
}

/// Applies one key of `nodes/` or `replicas/`; whether another replica's view changed.
fn apply(
    s: &Shared,
    records: &mut BTreeMap<String, (String, NodeRecord)>,
    live: &mut BTreeSet<String>,
    kv: &KeyValue,
    put: bool,
) -> bool {
    let key = String::from_utf8_lossy(kv.key());
    if let Some(replica) = key.strip_prefix(&s.key("replicas/")) {
        if put {
            live.insert(replica.to_owned());
        } else {
            live.remove(replica);
        }
        return replica != s.replica;
    }
    let Some(rest) = key.strip_prefix(&s.key("nodes/")) else {
        return false;
    };
    let Some((replica, _instance)) = rest.split_once('/') else {
        return false;
    };
    if replica == s.replica {
        return false;
    }
    if !put {
        return records.remove(rest).is_some();
    }
    match decode::<NodeRecord>(kv) {
        Ok(r) => {
            records.insert(rest.to_owned(), (replica.to_owned(), r));
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "a corrupt node record");
            false
        }
    }
}

fn publish_nodes(
    s: &Shared,
    records: &BTreeMap<String, (String, NodeRecord)>,
    live: &BTreeSet<String>,
) {
    let nodes = records
        .values()
        .map(|(replica, record)| RemoteNode {
            live: live.contains(replica),
            replica: replica.clone(),
            record: record.clone(),
        })
        .collect();
    s.nodes.send_replace(Arc::new(nodes));
}

impl Store for EtcdStore {
    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "etcd",
            location: format!("{} {}", self.shared.endpoints.join(","), self.shared.prefix),
            replica: Some(self.shared.replica.clone()),
        }
    }

    fn active(&self) -> Result<Option<Version>, StoreError> {
        self.call(|s| async move {
            let Some(kv) = s.get(s.key("active")).await? else {
                return Ok(None);
            };
            let n = parse_u64(&kv)?;
            match s.get(version_key(&s, n)).await? {
                Some(kv) => decode(&kv).map(Some),
                None => Err(StoreError::Corrupt(format!(
                    "the active version {n} is missing"
                ))),
            }
        })
    }

    fn version(&self, version: u64) -> Result<Option<Version>, StoreError> {
        self.call(move |s| async move {
            s.get(version_key(&s, version))
                .await?
                .map(|kv| decode(&kv))
                .transpose()
        })
    }

    fn history(&self, limit: u32) -> Result<Vec<Version>, StoreError> {
        self.call(move |s| async move {
            s.newest("versions", limit.max(1))
                .await?
                .iter()
                .map(decode)
                .collect()
        })
    }

    fn append_version(&self, expected: u64, new: &NewVersion<'_>) -> Result<u64, StoreError> {
        let now = now_ms();
        let n = expected + 1;
        let version = Version {
            version: n,
            kind: new.kind,
            map: new.map.clone(),
            fence: new.fence.clone(),
            author: new.author.to_owned(),
            comment: new.comment.to_owned(),
            created_at: now,
        };
        let audit = AuditEntry {
            id: 0,
            at: now,
            actor: new.author.to_owned(),
            action: format!("push.{}", new.kind.as_str()),
            version: Some(n),
            detail: serde_json::json!({ "comment": new.comment }),
        };
        self.call(move |s| async move {
            let active_key = s.key("active");
            let then = vec![
                TxnOp::put(version_key(&s, n), encode(&version), None),
                TxnOp::put(active_key.clone(), n.to_string(), None),
                audit_op(&s, &audit),
            ];
            let conflict = |active: u64| StoreError::Conflict { expected, active };
            if expected == 0 {
                // The first version: any replica may seed it, exactly one does.
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        active_key.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(then);
                let r = s.client.kv_client().txn(txn).await.map_err(etcd_error)?;
                if r.succeeded() {
                    s.active.send_replace(n);
                    return Ok(n);
                }
                return Err(conflict(s.active_now().await?));
            }
            let when = vec![Compare::value(
                active_key.clone(),
                CompareOp::Equal,
                expected.to_string(),
            )];
            let r = s.leader_txn(when, then, || conflict(0)).await;
            match r {
                Ok(()) => {
                    s.active.send_replace(n);
                    Ok(n)
                }
                Err(StoreError::Conflict { .. }) => Err(conflict(s.active_now().await?)),
                Err(e) => Err(e),
            }
        })
    }

    fn audit(&self, new: &NewAudit<'_>) -> Result<(), StoreError> {
        let entry = AuditEntry {
            id: 0,
            at: now_ms(),
            actor: new.actor.to_owned(),
            action: new.action.to_owned(),
            version: new.version,
            detail: new.detail.clone(),
        };
        // A leader write like any other: a deposed leader's late entry is refused.
        self.call(move |s| async move { s.leader_write(vec![audit_op(&s, &entry)]).await })
    }

    fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        self.call(move |s| async move {
            s.newest("audit", limit.max(1))
                .await?
                .iter()
                .map(|kv| {
                    let mut e: AuditEntry = decode(kv)?;
                    e.id = kv.create_revision();
                    Ok(e)
                })
                .collect()
        })
    }

    fn save_nodes(&self, nodes: &[NodeRecord]) -> Result<(), StoreError> {
        let s = &self.shared;
        let puts: Vec<TxnOp> = nodes
            .iter()
            .map(|n| {
                let key = s.key(&format!("nodes/{}/{}", s.replica, n.id));
                TxnOp::put(key, encode(n), None)
            })
            .collect();
        self.call(move |s| async move { s.unconditional(puts).await })
    }

    fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.call(|s| async move {
            let dir = format!("nodes/{}", s.replica);
            let mut kvs = s.newest(&dir, 0).await?;
            kvs.reverse();
            kvs.iter().map(decode).collect()
        })
    }

    fn delete_nodes(&self, keys: &[String]) -> Result<usize, StoreError> {
        let keys = keys.to_vec();
        self.call(move |s| async move {
            let mut r = s
                .client
                .kv_client()
                .get(
                    s.key("nodes/"),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .map_err(etcd_error)?;
            let dir = s.key("nodes/");
            let doomed: Vec<String> = r
                .take_kvs()
                .iter()
                .filter_map(|kv| {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let instance = key.strip_prefix(&dir)?.split_once('/')?.1;
                    keys.iter().any(|k| k == instance).then_some(key)
                })
                .collect();
            // One Envoy instance, however many replicas held it: as SQLite counts.
            let instances: BTreeSet<&str> = doomed
                .iter()
                .filter_map(|k| k.strip_prefix(&dir)?.split_once('/').map(|(_, i)| i))
                .collect();
            let forgotten = instances.len();
            let dels = doomed.iter().map(|k| TxnOp::delete(k.clone(), None));
            s.unconditional(dels.collect()).await?;
            Ok(forgotten)
        })
    }

    fn insert_rollout(&self, state: &str, record: &serde_json::Value) -> Result<u64, StoreError> {
        let (state, record) = (state.to_owned(), record.clone());
        self.call(move |s| async move {
            for _ in 0..5 {
                let seq_key = s.key("rollout_seq");
                let (last, when) = match s.get(seq_key.clone()).await? {
                    Some(kv) => (
                        parse_u64(&kv)?,
                        Compare::mod_revision(seq_key.clone(), CompareOp::Equal, kv.mod_revision()),
                    ),
                    None => (
                        0,
                        Compare::create_revision(seq_key.clone(), CompareOp::Equal, 0),
                    ),
                };
                let id = last + 1;
                let mut record = record.clone();
                if let Some(obj) = record.as_object_mut() {
                    obj.insert("id".into(), serde_json::json!(id));
                }
                let stored = StoredRollout {
                    id,
                    state: state.clone(),
                    record,
                    abort_requested: None,
                };
                let then = vec![
                    TxnOp::put(seq_key, id.to_string(), None),
                    TxnOp::put(rollout_key(&s, id), encode(&stored), None),
                    TxnOp::put(s.key("rollout_unfinished"), id.to_string(), None),
                ];
                match s
                    .leader_txn(vec![when], then, || StoreError::Conflict {
                        expected: last,
                        active: last + 1,
                    })
                    .await
                {
                    Ok(()) => return Ok(id),
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(StoreError::Etcd(
                "the rollout sequence kept changing under this leader".into(),
            ))
        })
    }

    fn save_rollout(
        &self,
        id: u64,
        state: &str,
        record: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let stored = StoredRollout {
            id,
            state: state.to_owned(),
            record: record.clone(),
            abort_requested: None,
        };
        self.call(move |s| async move {
            let key = rollout_key(&s, id);
            let when = vec![Compare::create_revision(key.clone(), CompareOp::Greater, 0)];
            let then = vec![TxnOp::put(key, encode(&stored), None)];
            s.leader_txn(when, then, || {
                StoreError::Corrupt(format!("rollout {id} vanished"))
            })
            .await
        })
    }

    fn rollout(&self, id: u64) -> Result<Option<StoredRollout>, StoreError> {
        self.call(move |s| async move { read_rollout(&s, id).await })
    }

    fn rollouts(&self, limit: u32) -> Result<Vec<StoredRollout>, StoreError> {
        self.call(move |s| async move {
            let aborts = s.newest("aborts", 0).await?;
            let mut out = Vec::new();
            for kv in s.newest("rollouts", limit.max(1)).await? {
                let mut r: StoredRollout = decode(&kv)?;
                let key = abort_key(&s, r.id);
                r.abort_requested = aborts
                    .iter()
                    .find(|a| a.key() == key.as_bytes())
                    .map(|a| String::from_utf8_lossy(a.value()).into_owned());
                out.push(r);
            }
            Ok(out)
        })
    }

    fn unfinished_rollout(&self) -> Result<Option<StoredRollout>, StoreError> {
        self.call(|s| async move {
            let Some(kv) = s.get(s.key("rollout_unfinished")).await? else {
                return Ok(None);
            };
            read_rollout(&s, parse_u64(&kv)?).await
        })
    }

    fn request_abort(&self, id: u64, reason: &str) -> Result<(), StoreError> {
        let reason = reason.to_owned();
        self.call(move |s| async move {
            let then = vec![TxnOp::put(abort_key(&s, id), reason, None)];
            s.leader_write(then).await
        })
    }

    fn finish_rollout(&self, finish: &FinishRollout<'_>) -> Result<(), StoreError> {
        let stored = StoredRollout {
            id: finish.id,
            state: finish.state.to_owned(),
            record: finish.record.clone(),
            abort_requested: None,
        };
        let audit = AuditEntry {
            id: 0,
            at: now_ms(),
            actor: finish.actor.to_owned(),
            action: format!("rollout.{}", finish.state),
            version: finish.version,
            detail: finish.detail.clone(),
        };
        let id = finish.id;
        let may_hold = finish.may_hold.to_vec();
        self.call(move |s| async move {
            let current: BTreeMap<String, ServerState> = s
                .newest("servers", 0)
                .await?
                .iter()
                .map(|kv| decode::<ServerState>(kv).map(|st| (st.name.clone(), st)))
                .collect::<Result<_, _>>()?;
            let mut then = vec![
                TxnOp::put(rollout_key(&s, id), encode(&stored), None),
                TxnOp::delete(s.key("rollout_unfinished"), None),
                audit_op(&s, &audit),
            ];
            for (name, versions, restarted_at) in may_hold {
                let state = match (restarted_at, current.get(&name)) {
                    (Some(at), _) => ServerState {
                        name: name.clone(),
                        may_hold: versions,
                        last_restart_at: Some(at),
                        last_rollout: Some(id),
                    },
                    (None, Some(st)) => ServerState {
                        may_hold: versions,
                        ..st.clone()
                    },
                    (None, None) => continue,
                };
                then.push(TxnOp::put(
                    s.key(&format!("servers/{name}")),
                    encode(&state),
                    None,
                ));
            }
            if then.len() > MAX_TXN_OPS {
                return Err(StoreError::Etcd(format!(
                    "a rollout over {} servers does not fit one etcd transaction",
                    then.len() - 3
                )));
            }
            s.leader_write(then).await
        })
    }

    fn may_hold(&self, server: &str) -> Result<Option<Vec<u64>>, StoreError> {
        let key = format!("servers/{server}");
        self.call(move |s| async move {
            Ok(s.get(s.key(&key))
                .await?
                .map(|kv| decode::<ServerState>(&kv))
                .transpose()?
                .map(|st| st.may_hold))
        })
    }

    fn server_states(&self) -> Result<Vec<ServerState>, StoreError> {
        self.call(|s| async move {
            let mut kvs = s.newest("servers", 0).await?;
            kvs.reverse();
            kvs.iter().map(decode).collect()
        })
    }

    fn advertise(&self, api: &str) {
        if *self.shared.advertised.borrow() {
            return;
        }
        if !self.shared.configured_api {
            self.shared.lock_info().api = api.to_owned();
        }
        self.shared.advertised.send_replace(true);
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.shared.leadership.subscribe()
    }

    fn watch_active(&self) -> watch::Receiver<u64> {
        self.shared.active.subscribe()
    }

    fn currency(&self) -> watch::Receiver<Currency> {
        self.shared.currency.subscribe()
    }

    fn watch_nodes(&self) -> watch::Receiver<Arc<Vec<RemoteNode>>> {
        self.shared.nodes.subscribe()
    }
}

async fn read_rollout(s: &Shared, id: u64) -> Result<Option<StoredRollout>, StoreError> {
    let Some(kv) = s.get(rollout_key(s, id)).await? else {
        return Ok(None);
    };
    let mut r: StoredRollout = decode(&kv)?;
    r.abort_requested = s
        .get(abort_key(s, id))
        .await?
        .map(|a| String::from_utf8_lossy(a.value()).into_owned());
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_own_request_timeout_is_unavailable_not_an_internal_error() {
        // What a request gets when `with_timeout` expires first (seen as a 500).
        let e = etcd_client::Error::GRpcStatus(tonic::Status::cancelled("Timeout expired"));
        assert!(matches!(etcd_error(e), StoreError::Unavailable(_)));
        let e = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument("bad"));
        assert!(matches!(etcd_error(e), StoreError::Etcd(_)));
    }
}
