//! A proxy-wasm ABI v0.2.1 host on wasmtime, to test and benchmark built
//! filters (`.wasm` files) without Envoy. Not shipped to users.
//!
//! ```no_run
//! use wasm_host::{Action, Host, built_filter};
//!
//! let host = Host::load(built_filter("bench-noop")?)?;
//! let mut vm = host.instantiate()?;
//! assert!(vm.start(b"")?);
//! assert!(vm.configure(br#"{"header": "x-foo"}"#)?);
//! let request = vm.new_http_context()?;
//! let action = vm.request_headers(request, &[(":path", "/ping/")], true)?;
//! assert_eq!(action, Action::Continue);
//! assert_eq!(vm.request_header(request, "x-foo"), Some("dtable-server"));
//! vm.finish(request)?;
//! # Ok::<(), wasm_host::HostError>(())
//! ```
//!
//! The host implements what the proxy-wasm Rust SDK imports: logging, time,
//! tick period, the VM and plugin configuration buffers, the four HTTP header
//! maps, local replies, metrics, properties (kept in a map), effective
//! context, continue/close stream, done; and the WASI preview1 functions of a
//! `wasm32-wasip1` filter (stdout/stderr are captured, no environment, no
//! arguments, a deterministic `random_get`). Any other imported function
//! returns `Unimplemented` (12), or `ENOSYS` for WASI.
//!
//! Header names and values must be UTF-8 (a filter that sets other bytes gets
//! `BadArgument`); names the filter sets are lowercased, lookups ignore case,
//! as in Envoy.

mod abi;
mod artifact;
mod imports;
mod state;
mod vm;

use std::error::Error;
use std::path::PathBuf;

pub use abi::{Action, LogLevel, MetricKind, Status, decode_header_map, encode_header_map};
pub use artifact::built_filter;
pub use state::{LocalResponse, LogEntry, Metric};
pub use vm::{ContextId, Host, Vm};
pub use wasmtime::{Trap, Val};

/// Everything that can go wrong while loading or running a filter.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The `.wasm` file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The module is not valid WebAssembly or failed to compile.
    #[error("cannot compile the filter: {0}")]
    Compile(#[source] Box<dyn Error + Send + Sync>),
    /// The module exports no `proxy_abi_version_0_2_1` (nor `_0_2_0`).
    #[error("the filter does not export proxy_abi_version_0_2_1 (or 0_2_0)")]
    UnsupportedAbi,
    /// The module imports something other than a function.
    #[error("the filter imports {module}::{name}, which is not a function")]
    UnsupportedImport {
        /// The import module.
        module: String,
        /// The import name.
        name: String,
    },
    /// Linking or instantiating failed.
    #[error("cannot instantiate the filter: {0}")]
    Instantiate(#[source] Box<dyn Error + Send + Sync>),
    /// A required export is missing.
    #[error("the filter does not export `{0}`")]
    MissingExport(String),
    /// An export has a signature other than the ABI's.
    #[error("the filter's export `{name}` has an unexpected type: {source}")]
    ExportType {
        /// The export.
        name: &'static str,
        /// What wasmtime said.
        source: Box<dyn Error + Send + Sync>,
    },
    /// The guest trapped: with the Rust SDK and `panic = "abort"`, a panic.
    #[error("the filter trapped in `{function}` ({trap}){}", said(guest_output))]
    Trap {
        /// The export that was called.
        function: String,
        /// The trap (a panic is `UnreachableCodeReached`).
        trap: Trap,
        /// What the guest logged at `Critical` level (the SDK's panic hook)
        /// and wrote to stderr during the call; often the panic message.
        guest_output: String,
    },
    /// The guest called WASI `proc_exit`.
    #[error("the filter exited with code {code} in `{function}`")]
    Exit {
        /// The export that was called.
        function: String,
        /// The exit code.
        code: i32,
    },
    /// A guest call failed in another way.
    #[error("calling `{function}` failed: {source}")]
    Call {
        /// The export that was called.
        function: String,
        /// What wasmtime said.
        source: Box<dyn Error + Send + Sync>,
    },
    /// The VM trapped or exited earlier; its state is unknown.
    #[error("the VM trapped or exited earlier; instantiate a new one")]
    Poisoned,
    /// [`Vm::start`] was not called yet.
    #[error("the VM is not started: call Vm::start first")]
    NotStarted,
    /// [`Vm::start`] was called twice.
    #[error("the VM is already started")]
    AlreadyStarted,
    /// The context does not exist (never created, or deleted).
    #[error("unknown HTTP context {0}")]
    UnknownContext(u32),
    /// All `u32` context ids are used up.
    #[error("no context id left")]
    TooManyContexts,
    /// `cargo build` of a filter failed or did not produce the artifact.
    #[error("cannot build filter {package}: {detail}")]
    Build {
        /// The filter's package.
        package: String,
        /// Why (cargo's output, or the missing path).
        detail: String,
    },
}

fn said(guest_output: &str) -> String {
    if guest_output.is_empty() {
        String::new()
    } else {
        format!(": {guest_output}")
    }
}
