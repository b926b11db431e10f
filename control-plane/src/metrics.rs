//! Prometheus metrics: counters kept here, gauges computed from the state at scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::nodes::{Conflict, Node};
use crate::resources::{ResourceType, Snapshot};

/// A label value in the text format: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct Metrics {
    pushes: AtomicU64,
    /// Per type, in [`ResourceType::ALL`] order: responses sent, ACKs, NACKs.
    responses: [AtomicU64; 2],
    acks: [AtomicU64; 2],
    nacks: [AtomicU64; 2],
    rest_polls: AtomicU64,
    api_errors: AtomicU64,
    rollouts_done: AtomicU64,
    rollouts_rolled_back: AtomicU64,
    server_restarts: AtomicU64,
    /// 1 while a rollout runs here.
    rollout_running: AtomicU64,
    leader: AtomicU64,
    /// ADS streams refused: their peer held `max_streams_per_peer`.
    streams_refused: AtomicU64,
    /// ADS streams ended because their Envoy read nothing for `send_timeout`.
    slow_consumers: AtomicU64,
    /// Per [`TlsListener`]: handshakes refused or not completed in time.
    tls_handshake_failures: [AtomicU64; 2],
    /// ADS streams ended because the node id is not the client certificate's.
    node_id_refusals: AtomicU64,
}

/// A listener that speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsListener {
    /// ADS (`[listen.tls]`).
    Ads,
    /// The HTTP API (`[api.tls]`).
    Api,
}

impl TlsListener {
    const ALL: [TlsListener; 2] = [TlsListener::Ads, TlsListener::Api];

    fn slot(self) -> usize {
        self as usize
    }

    fn as_str(self) -> &'static str {
        match self {
            TlsListener::Ads => "ads",
            TlsListener::Api => "api",
        }
    }
}

fn slot(t: ResourceType) -> usize {
    match t {
        ResourceType::Cds => 0,
        ResourceType::Ecds => 1,
    }
}

impl Metrics {
    pub fn pushed(&self) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
    }
    pub fn responded(&self, t: ResourceType) {
        self.responses[slot(t)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn acked(&self, t: ResourceType) {
        self.acks[slot(t)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn nacked(&self, t: ResourceType) {
        self.nacks[slot(t)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn rest_polled(&self) {
        self.rest_polls.fetch_add(1, Ordering::Relaxed);
    }
    pub fn api_error(&self) {
        self.api_errors.fetch_add(1, Ordering::Relaxed);
    }
    /// A rollout ended: `done` or rolled back.
    pub fn rollout_finished(&self, done: bool) {
        let c = if done {
            &self.rollouts_done
        } else {
            &self.rollouts_rolled_back
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
    /// An ADS stream was refused (its peer held too many).
    pub fn stream_refused(&self) {
        self.streams_refused.fetch_add(1, Ordering::Relaxed);
    }
    /// An ADS stream was ended: its Envoy read nothing.
    pub fn slow_consumer(&self) {
        self.slow_consumers.fetch_add(1, Ordering::Relaxed);
    }
    /// A restart hook succeeded.
    pub fn server_restarted(&self) {
        self.server_restarts.fetch_add(1, Ordering::Relaxed);
    }
    /// A rollout's driver started (`true`) or stopped.
    pub fn rollout_running(&self, running: bool) {
        self.rollout_running
            .store(u64::from(running), Ordering::Relaxed);
    }

    /// This replica became the leader (`true`) or does not lead.
    pub fn leader(&self, leads: bool) {
        self.leader.store(u64::from(leads), Ordering::Relaxed);
    }

    /// A TLS handshake on `l` was refused (e.g. no or an untrusted client
    /// certificate) or not completed in time.
    pub fn tls_handshake_failed(&self, l: TlsListener) {
        self.tls_handshake_failures[l.slot()].fetch_add(1, Ordering::Relaxed);
    }
    /// An ADS stream named a node id its client certificate does not carry.
    pub fn node_id_refused(&self) {
        self.node_id_refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// Responses of type `t` sent so far.
    pub fn responses(&self, t: ResourceType) -> u64 {
        self.responses[slot(t)].load(Ordering::Relaxed)
    }

    /// The text exposition format.
    pub fn render(&self, snapshot: &Snapshot, nodes: &[Node], conflicts: &[Conflict]) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let per_type = |c: &[AtomicU64; 2]| -> Vec<(String, u64)> {
            ResourceType::ALL
                .iter()
                .map(|t| {
                    (
                        format!("{{type=\"{}\"}}", t.as_str()),
                        c[slot(*t)].load(Ordering::Relaxed),
                    )
                })
                .collect()
        };
        metric(
            "seashard_map_version",
            "gauge",
            "The active map version.",
            &[(String::new(), snapshot.map_version)],
        );
        // One number each.
        for (name, kind, help, value) in [
            (
                "seashard_pushes_total",
                "counter",
                "Versions published.",
                &self.pushes,
            ),
            (
                "seashard_rest_polls_total",
                "counter",
                "REST xDS polls.",
                &self.rest_polls,
            ),
            (
                "seashard_api_errors_total",
                "counter",
                "API requests answered with an error.",
                &self.api_errors,
            ),
            (
                "seashard_server_restarts_total",
                "counter",
                "dtable-servers restarted by a rollout's hook.",
                &self.server_restarts,
            ),
            (
                "seashard_rollout_running",
                "gauge",
                "1 while a rollout runs.",
                &self.rollout_running,
            ),
            (
                "seashard_leader",
                "gauge",
                "1 while this control plane replica leads (runs rollouts, publishes versions).",
                &self.leader,
            ),
            (
                "seashard_ads_node_id_refused_total",
                "counter",
                "ADS streams ended with PERMISSION_DENIED: the node id is not the client certificate's.",
                &self.node_id_refusals,
            ),
            (
                "seashard_ads_streams_refused_total",
                "counter",
                "ADS streams refused because their peer address held `max_streams_per_peer`.",
                &self.streams_refused,
            ),
            (
                "seashard_ads_slow_consumers_total",
                "counter",
                "ADS streams ended because their Envoy read nothing for `send_timeout`.",
                &self.slow_consumers,
            ),
        ] {
            metric(
                name,
                kind,
                help,
                &[(String::new(), value.load(Ordering::Relaxed))],
            );
        }
        // One number per resource type.
        for (name, help, counts) in [
            (
                "seashard_xds_responses_total",
                "Discovery responses sent.",
                &self.responses,
            ),
            ("seashard_xds_acks_total", "ACKs received.", &self.acks),
            ("seashard_xds_nacks_total", "NACKs received.", &self.nacks),
        ] {
            metric(name, "counter", help, &per_type(counts));
        }
        metric(
            "seashard_rollouts_total",
            "counter",
            "Rollouts ended, by outcome.",
            &[
                (
                    "{state=\"done\"}".into(),
                    self.rollouts_done.load(Ordering::Relaxed),
                ),
                (
                    "{state=\"rolled_back\"}".into(),
                    self.rollouts_rolled_back.load(Ordering::Relaxed),
                ),
            ],
        );
        let handshakes: Vec<(String, u64)> = TlsListener::ALL
            .iter()
            .map(|l| {
                (
                    format!("{{listener=\"{}\"}}", l.as_str()),
                    self.tls_handshake_failures[l.slot()].load(Ordering::Relaxed),
                )
            })
            .collect();
        metric(
            "seashard_tls_handshake_failures_total",
            "counter",
            "TLS handshakes refused (no or an untrusted certificate, not TLS) or not completed in time.",
            &handshakes,
        );
        let connected = nodes.iter().filter(|n| n.connected).count() as u64;
        metric(
            "seashard_nodes",
            "gauge",
            "Known Envoy nodes, by connection state.",
            &[
                ("{state=\"connected\"}".into(), connected),
                (
                    "{state=\"disconnected\"}".into(),
                    nodes.len() as u64 - connected,
                ),
            ],
        );
        // Per type, the nodes for which `state` holds of the current version.
        let nodes_per_type = |state: &dyn Fn(&Node, ResourceType, &str) -> bool| {
            ResourceType::ALL
                .iter()
                .map(|t| {
                    let v = snapshot.get(*t).version.as_str();
                    let n = nodes.iter().filter(|n| state(n, *t, v)).count() as u64;
                    (format!("{{type=\"{}\"}}", t.as_str()), n)
                })
                .collect::<Vec<_>>()
        };
        let current = nodes_per_type(&|n, t, v| n.connected && n.acked(t) == Some(v));
        metric(
            "seashard_nodes_current",
            "gauge",
            "Connected nodes that ACKed the current version.",
            &current,
        );
        let nacking = nodes_per_type(&|n, t, v| n.nacked(t) == Some(v));
        metric(
            "seashard_nodes_nacked_current",
            "gauge",
            "Nodes that NACKed the current version.",
            &nacking,
        );
        metric(
            "seashard_node_id_conflicts",
            "gauge",
            "Node ids held by more than one Envoy (rollouts that wait for them refuse to run).",
            &[(String::new(), conflicts.len() as u64)],
        );
        let holders: Vec<(String, u64)> = conflicts
            .iter()
            .flat_map(|c| {
                c.instances.iter().map(|p| {
                    (
                        format!(
                            "{{node=\"{}\",instance=\"{}\",peers=\"{}\"}}",
                            label(&c.id),
                            label(&p.instance),
                            label(&p.streams_from.join(" "))
                        ),
                        u64::from(p.connected),
                    )
                })
            })
            .collect();
        metric(
            "seashard_node_id_conflict_instance",
            "gauge",
            "Each holder of a conflicting node id: 1 connected, 0 disconnected.",
            &holders,
        );
        out
    }
}
