//! What the host keeps per VM: configuration, streams and what the guest did.

use std::collections::HashMap;

use wasmtime::{Memory, TypedFunc};

use crate::abi::{LogLevel, MapType, MetricKind};

/// One header map: pairs in order, names as the guest or the test gave them.
pub(crate) type Headers = Vec<(String, String)>;

/// A reply sent by the filter with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status: u32,
    /// Response body.
    pub body: Vec<u8>,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// The "response code details" string (Envoy's `%RESPONSE_CODE_DETAILS%`).
    pub details: String,
    /// gRPC status, or -1 for a plain HTTP reply.
    pub grpc_status: i32,
}

/// A line written with `proxy_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The level the guest gave.
    pub level: LogLevel,
    /// The message, with invalid UTF-8 replaced.
    pub message: String,
}

/// A metric defined by the guest, with its current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// The name given to `proxy_define_metric`.
    pub name: String,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The counter or gauge value; for a histogram, the last recorded value.
    pub value: u64,
    /// Every value recorded into a histogram (empty for counters and gauges).
    pub samples: Vec<u64>,
}

/// The header maps and reply of one HTTP context.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    pub(crate) maps: [Headers; 4],
    pub(crate) local_response: Option<LocalResponse>,
}

impl Stream {
    pub(crate) fn map(&self, map: MapType) -> &Headers {
        &self.maps[map as usize]
    }

    pub(crate) fn map_mut(&mut self, map: MapType) -> &mut Headers {
        &mut self.maps[map as usize]
    }
}

/// The guest's memory and allocator, known once the instance exists.
#[derive(Clone)]
pub(crate) struct Guest {
    pub(crate) memory: Memory,
    pub(crate) allocate: TypedFunc<u32, u32>,
}

/// The store data of a VM.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) guest: Option<Guest>,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) plugin_configuration: Vec<u8>,
    /// The context host functions act on (`proxy_set_effective_context`).
    pub(crate) effective_context: u32,
    pub(crate) root_context: u32,
    pub(crate) streams: HashMap<u32, Stream>,
    pub(crate) properties: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) tick_period_ms: u32,
    pub(crate) logs: Vec<LogEntry>,
    pub(crate) metrics: Vec<Metric>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    /// State of the deterministic generator behind WASI `random_get`.
    pub(crate) random: u64,
    /// `proxy_{get,set}_shared_data`: shared by every VM of one [`crate::Host`], as
    /// Envoy shares it between the VMs of one `vm_id`. Per key: value and cas.
    pub(crate) shared: SharedData,
}

/// Envoy's shared data: key → (value, cas).
pub(crate) type SharedData = std::sync::Arc<std::sync::Mutex<HashMap<Vec<u8>, (Vec<u8>, u32)>>>;

impl State {
    /// Whether `id` is the root context or a live HTTP context.
    pub(crate) fn is_context(&self, id: u32) -> bool {
        id == self.root_context || self.streams.contains_key(&id)
    }
}
