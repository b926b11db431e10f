//! What seashard's two daemons share: the control plane (`seactl serve`) and the
//! restart agent on each dtable-server host (`seactl agent`). Both serve an HTTP API
//! that may be HTTPS and takes a bearer token, never show a secret, read durations
//! from TOML, and check a dtable-server's health.
//!
//! - [`tls`]: server and client configurations (rustls with ring), listeners whose
//!   handshakes run with a deadline, each in its own task.
//! - [`token`]: the bearer token of a request, compared in constant time.
//! - [`secret`]: `<redacted>`, what names a secret, URLs and messages scrubbed.
//! - [`duration`]: `500ms`, `10s`, `2m`, `1h`, and their serde forms.
//! - [`health`]: `GET /ping/` → `pong`, and the small bounded HTTP/1.1 client the
//!   restart hooks use.
//!
//! It knows nothing of shard maps, Envoys or rollouts.

pub mod duration;
pub mod health;
pub mod secret;
pub mod tls;
pub mod token;
