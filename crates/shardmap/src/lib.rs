//! The seashard routing core: the one definition of where a SeaTable base lives.
//!
//! A [`ShardMap`] (what an operator writes) is validated — every problem reported at
//! once — and compiled into a [`Router`], whose [`Router::decide`] takes a request
//! target and answers with a [`Decision`]: the server, the [`Reason`] and the base.
//! A [`RouterConfig`] (the filter's configuration) compiles into a [`Gate`], whose
//! [`Gate::verdict`] is the filter's whole per-request decision, edge or guard: route,
//! pass, or refuse with a ready answer.
//! [`diff`] turns two maps into the [`Plan`] of a rollout, [`nginx`] imports SeaTable's
//! nginx map and [`rebalance`] evens slots out across servers.
//!
//! Pure: no I/O, no async. The filter, the control plane and `seactl` all call this
//! crate, so they can never disagree about where a base lives.

mod config;
mod gate;
mod hex;
mod map;
pub mod nginx;
mod plan;
mod problem;
mod rebalance;
mod router;
mod unique;
mod uuid;

pub use config::{DEFAULT_HEADER, DEFAULT_RETRY_AFTER, OlderMap, RouterConfig, may_apply};
pub use gate::{AWAITING_MAP_VERSION, Gate, Refusal, RefusalKind, Verdict};
pub use hex::{MAX_SLOT_DIGITS, SlotRange, canonical_pin};
pub use map::{
    MAX_PATH_RULES, MAX_PINS, MAX_REGEX_LEN, MAX_REGEX_SIZE, MAX_SERVER_NAME_LEN, MAX_SERVERS,
    PathRule, ShardMap, check_server_name,
};
pub use plan::{Move, PinChange, Plan, SlotMove, diff, owners_within};
pub use problem::{Problem, Problems};
pub use rebalance::{Change, Rebalance, RebalanceError, rebalance};
pub use router::{Decision, Fence, Reason, Router};
pub use unique::check_unique_keys;
pub use uuid::{BaseUuid, Unreadable, extract, read_base};
