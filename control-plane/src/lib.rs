//! The seashard control plane: it keeps the shard map's versions, pushes the active
//! one to every Envoy over ADS (ECDS for the base-router filter, CDS for the
//! dtable-servers), tracks each Envoy's ACK/NACK, and offers an HTTP API to read the
//! state and propose maps.
//!
//! Read top-down:
//! - [`config`]: the TOML file (listen addresses, store, token, servers, filter).
//! - [`store`]: the [`Store`] trait: SQLite (WAL, one control plane) or etcd
//!   (several replicas, one leader elected on a lease, leader writes fenced by
//!   its term, watches): versions, rollouts, nodes, audit.
//! - [`resources`]: what Envoys are sent, as protobuf and as JSON, with versions.
//! - [`nodes`]: per-node, per-type ACK/NACK tracking; never resend NACKed content.
//! - [`plane`]: the core: propose/publish a map, wait until every Envoy ACKed.
//! - [`rollout`]: a map that moves bases: plan, fence, restart, activate, done (or
//!   roll back), each step stored before it acts, resumed after a restart.
//! - [`xds`]: ADS over gRPC (tonic); [`api`]: HTTP API and REST xDS (axum);
//!   [`forward`]: a follower replica's API changes go to the leader; [`answer`]:
//!   the error answer both give.
//! - [`server`]: binds and runs both. (Envoy bootstraps for it are written by the
//!   `deploy` crate, `seactl envoy-bootstrap`.)
//! - [`tls`]: the HTTPS API and ADS mutual TLS (on the `daemon` crate's TLS, which
//!   the restart agent shares; so are tokens, redaction and the health client);
//!   [`identity`]: the node id a client certificate proves (the certificates of
//!   installs without a PKI are made by the `certs` crate, `seactl certs`).
//! - The restart agent an HTTP restart hook may call (`seactl agent`) is the `agent`
//!   crate.
//!
//! It never decides where a base lives: validation, routing and plans are
//! `shardmap`'s.

pub mod answer;
pub mod api;
pub mod config;
pub mod forward;
pub mod identity;
pub mod metrics;
pub mod nodes;
pub mod plane;
pub mod resources;
pub mod rollout;
pub mod server;
pub mod signals;
pub mod store;
pub mod tls;
pub mod xds;

pub use config::{Config, ConfigError, RestartHook, ServerConfig};
pub use nodes::{Convergence, Registry};
pub use plane::{ControlPlane, Outcome, Proposal, ProposeError, StartError};
pub use resources::{ResourceType, Snapshot};
pub use rollout::{Rollout, RolloutError, Step};
pub use server::{Running, ServeError, start};
pub use store::{SqliteStore, Store, StoreError, Version, VersionKind};
