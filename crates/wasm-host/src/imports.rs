//! The host functions: proxy-wasm ABI v0.2.1 (`env`) and the few WASI preview1
//! functions a `wasm32-wasip1` filter imports.

use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Engine, ExternType, Linker, Module, Store, Val};

use crate::HostError;
use crate::abi::{
    self, BUFFER_PLUGIN_CONFIGURATION, BUFFER_VM_CONFIGURATION, LogLevel, MapType, MetricKind,
    Status, WASI_EBADF, WASI_EFAULT, WASI_EINVAL, WASI_ENOSYS,
};
use crate::state::{Guest, Headers, LocalResponse, LogEntry, Metric, State};

const ENV: &str = "env";
const WASI: &str = "wasi_snapshot_preview1";

/// Why a host function did not succeed.
enum Failure {
    /// Report this status to the guest.
    Status(Status),
    /// Stop the guest: a trap inside a re-entrant call (the allocator), or exit.
    Wasm(wasmtime::Error),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Self::Status(status)
    }
}

impl From<wasmtime::Error> for Failure {
    fn from(error: wasmtime::Error) -> Self {
        Self::Wasm(error)
    }
}

type HostResult<T = ()> = Result<T, Failure>;

/// The guest called WASI `proc_exit`.
#[derive(Debug, thiserror::Error)]
#[error("the guest called proc_exit({0})")]
pub(crate) struct GuestExit(pub(crate) i32);

/// Turns a host function's outcome into the ABI status it returns.
fn status(result: HostResult) -> wasmtime::Result<u32> {
    match result {
        Ok(()) => Ok(Status::Ok as u32),
        Err(Failure::Status(status)) => Ok(status as u32),
        Err(Failure::Wasm(error)) => Err(error),
    }
}

/// Turns a WASI function's outcome into its `errno` (invalid memory → `EFAULT`).
fn errno(result: HostResult) -> wasmtime::Result<u32> {
    match result {
        Ok(()) => Ok(0),
        Err(Failure::Status(Status::InvalidMemoryAccess)) => Ok(WASI_EFAULT),
        Err(Failure::Status(_)) => Ok(WASI_EINVAL),
        Err(Failure::Wasm(error)) => Err(error),
    }
}

/// Defines the proxy-wasm (`env`) host function `$name`: its body is run as a
/// [`HostResult`] and answered as the ABI status ([`status`]). The first
/// parameter is the caller (`Caller<'_, State>`), the others are typed.
macro_rules! proxy_fn {
    ($linker:ident, $name:literal, |$caller:pat_param $(, $arg:ident: $ty:ty)* $(,)?| $body:block) => {
        $linker.func_wrap(
            ENV,
            $name,
            |$caller: Caller<'_, State> $(, $arg: $ty)*| status((|| $body)()),
        )
    };
}

fn guest<'a>(caller: &'a Caller<'_, State>) -> HostResult<&'a Guest> {
    Ok(caller
        .data()
        .guest
        .as_ref()
        .ok_or(Status::InternalFailure)?)
}

/// Copies `len` bytes at `ptr` out of the guest's memory.
fn read(caller: &Caller<'_, State>, ptr: u32, len: u32) -> HostResult<Vec<u8>> {
    let memory = guest(caller)?.memory;
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    Ok(memory
        .data(caller)
        .get(start..end)
        .ok_or(Status::InvalidMemoryAccess)?
        .to_vec())
}

/// Like [`read`], for text that must be UTF-8 (header names and values).
fn read_string(caller: &Caller<'_, State>, ptr: u32, len: u32) -> HostResult<String> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Failure::Status(Status::BadArgument))
}

fn write(caller: &mut Caller<'_, State>, ptr: u32, bytes: &[u8]) -> HostResult {
    let memory = guest(caller)?.memory;
    let start = ptr as usize;
    let end = start
        .checked_add(bytes.len())
        .ok_or(Status::InvalidMemoryAccess)?;
    memory
        .data_mut(caller)
        .get_mut(start..end)
        .ok_or(Status::InvalidMemoryAccess)?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut Caller<'_, State>, ptr: u32, value: u32) -> HostResult {
    write(caller, ptr, &value.to_le_bytes())
}

fn write_u64(caller: &mut Caller<'_, State>, ptr: u32, value: u64) -> HostResult {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands `bytes` to the guest: copies them into memory obtained from the
/// guest's allocator (which the guest then owns) and writes the pointer and
/// size at `ptr_out` and `size_out`. Empty data is returned as `(0, 0)`.
fn return_bytes(
    caller: &mut Caller<'_, State>,
    bytes: &[u8],
    ptr_out: u32,
    size_out: u32,
) -> HostResult {
    let size = u32::try_from(bytes.len()).map_err(|_| Status::InternalFailure)?;
    let ptr = if bytes.is_empty() {
        0
    } else {
        let allocate = guest(caller)?.allocate.clone();
        let ptr = allocate.call(&mut *caller, size)?;
        if ptr == 0 {
            return Err(Status::InternalFailure.into());
        }
        write(caller, ptr, bytes)?;
        ptr
    };
    write_u32(caller, ptr_out, ptr)?;
    write_u32(caller, size_out, size)
}

/// The header map `map` of the effective context.
fn headers_mut(state: &mut State, map: u32) -> HostResult<&mut Headers> {
    let map = MapType::from_abi(map).ok_or(Status::BadArgument)?;
    let stream = state
        .streams
        .get_mut(&state.effective_context)
        .ok_or(Status::BadArgument)?;
    Ok(stream.map_mut(map))
}

fn headers(state: &State, map: u32) -> HostResult<&Headers> {
    let map = MapType::from_abi(map).ok_or(Status::BadArgument)?;
    let stream = state
        .streams
        .get(&state.effective_context)
        .ok_or(Status::BadArgument)?;
    Ok(stream.map(map))
}

/// Header maps as the guest sends them: UTF-8 text, names lowercased.
fn decode_headers(bytes: &[u8]) -> HostResult<Headers> {
    let pairs = abi::decode_header_map(bytes).ok_or(Status::ParseFailure)?;
    pairs
        .into_iter()
        .map(
            |(k, v)| match (String::from_utf8(k), String::from_utf8(v)) {
                (Ok(k), Ok(v)) => Ok((k.to_ascii_lowercase(), v)),
                _ => Err(Failure::Status(Status::BadArgument)),
            },
        )
        .collect()
}

fn metric_mut(state: &mut State, id: u32) -> HostResult<&mut Metric> {
    Ok(state.metrics.get_mut(id as usize).ok_or(Status::NotFound)?)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One step of splitmix64: deterministic bytes for WASI `random_get`.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A linker with every host function this crate implements.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<State>> {
    let mut linker = Linker::new(engine);
    define_proxy(&mut linker)?;
    define_headers(&mut linker)?;
    define_metrics(&mut linker)?;
    define_wasi(&mut linker)?;
    Ok(linker)
}

fn define_proxy(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    proxy_fn!(
        linker,
        "proxy_log",
        |mut caller, level: u32, ptr: u32, len: u32| {
            let level = LogLevel::from_abi(level).ok_or(Status::BadArgument)?;
            let message = String::from_utf8_lossy(&read(&caller, ptr, len)?).into_owned();
            caller.data_mut().logs.push(LogEntry { level, message });
            Ok(())
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_get_shared_data",
        |mut caller, key: u32, key_len: u32, ptr_out: u32, size_out: u32, cas_out: u32| {
            let key = read(&caller, key, key_len)?;
            let found = caller
                .data()
                .shared
                .lock()
                .map_err(|_| Status::InternalFailure)?
                .get(&key)
                .cloned();
            let (value, cas) = found.ok_or(Status::NotFound)?;
            return_bytes(&mut caller, &value, ptr_out, size_out)?;
            write_u32(&mut caller, cas_out, cas)
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_set_shared_data",
        |caller, key: u32, key_len: u32, ptr: u32, len: u32, cas: u32| {
            let key = read(&caller, key, key_len)?;
            let value = read(&caller, ptr, len)?;
            let mut shared = caller
                .data()
                .shared
                .lock()
                .map_err(|_| Status::InternalFailure)?;
            // As Envoy: cas 0 writes unconditionally, another must match.
            let next = match shared.get(&key) {
                Some((_, current)) if cas != 0 && cas != *current => {
                    return Err(Status::CasMismatch.into());
                }
                Some((_, current)) => current.wrapping_add(1).max(1),
                None => 1,
            };
            shared.insert(key, (value, next));
            Ok(())
        }
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_log_level",
        |mut caller: Caller<'_, State>, level_out: u32| {
            status(write_u32(&mut caller, level_out, LogLevel::Trace as u32))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut caller: Caller<'_, State>, time_out: u32| {
            status(write_u64(&mut caller, time_out, now_nanos()))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_tick_period_milliseconds",
        |mut caller: Caller<'_, State>, period: u32| {
            caller.data_mut().tick_period_ms = period;
            status(Ok(()))
        },
    )?;
    proxy_fn!(
        linker,
        "proxy_get_buffer_bytes",
        |mut caller, buffer: u32, start: u32, max_size: u32, ptr_out: u32, size_out: u32| {
            let state = caller.data();
            let data = match buffer {
                BUFFER_VM_CONFIGURATION => &state.vm_configuration,
                BUFFER_PLUGIN_CONFIGURATION => &state.plugin_configuration,
                _ => return Err(Status::NotFound.into()),
            };
            let start = start as usize;
            let end = data.len().min(start.saturating_add(max_size as usize));
            let bytes = data.get(start..end).ok_or(Status::BadArgument)?.to_vec();
            return_bytes(&mut caller, &bytes, ptr_out, size_out)
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_get_property",
        |mut caller, path: u32, path_len: u32, ptr_out: u32, size_out: u32| {
            let path = read(&caller, path, path_len)?;
            let value = caller
                .data()
                .properties
                .get(&path)
                .ok_or(Status::NotFound)?
                .clone();
            return_bytes(&mut caller, &value, ptr_out, size_out)
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_set_property",
        |mut caller, path: u32, path_len: u32, value: u32, value_len: u32| {
            let path = read(&caller, path, path_len)?;
            let value = read(&caller, value, value_len)?;
            caller.data_mut().properties.insert(path, value);
            Ok(())
        }
    )?;
    for name in ["proxy_continue_stream", "proxy_close_stream"] {
        linker.func_wrap(ENV, name, |_: Caller<'_, State>, stream: u32| {
            // HttpRequest, HttpResponse, Downstream, Upstream.
            status(if stream <= 3 {
                Ok(())
            } else {
                Err(Status::BadArgument.into())
            })
        })?;
    }
    proxy_fn!(
        linker,
        "proxy_send_local_response",
        |mut caller,
         code: u32,
         details: u32,
         details_len: u32,
         body: u32,
         body_len: u32,
         headers: u32,
         headers_len: u32,
         grpc_status: i32| {
            let details =
                String::from_utf8_lossy(&read(&caller, details, details_len)?).into_owned();
            let body = read(&caller, body, body_len)?;
            let headers = decode_headers(&read(&caller, headers, headers_len)?)?;
            let state = caller.data_mut();
            let stream = state
                .streams
                .get_mut(&state.effective_context)
                .ok_or(Status::BadArgument)?;
            stream.local_response = Some(LocalResponse {
                status: code,
                body,
                headers,
                details,
                grpc_status,
            });
            Ok(())
        }
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_effective_context",
        |mut caller: Caller<'_, State>, context: u32| {
            let state = caller.data_mut();
            status(if state.is_context(context) {
                state.effective_context = context;
                Ok(())
            } else {
                Err(Status::BadArgument.into())
            })
        },
    )?;
    linker.func_wrap(ENV, "proxy_done", |_: Caller<'_, State>| status(Ok(())))?;
    Ok(())
}

fn define_headers(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    proxy_fn!(
        linker,
        "proxy_get_header_map_pairs",
        |mut caller, map: u32, ptr_out: u32, size_out: u32| {
            let bytes = abi::encode_header_map(headers(caller.data(), map)?);
            return_bytes(&mut caller, &bytes, ptr_out, size_out)
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_set_header_map_pairs",
        |mut caller, map: u32, ptr: u32, len: u32| {
            let pairs = decode_headers(&read(&caller, ptr, len)?)?;
            *headers_mut(caller.data_mut(), map)? = pairs;
            Ok(())
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_get_header_map_value",
        |mut caller, map: u32, key: u32, key_len: u32, ptr_out: u32, size_out: u32| {
            let key = read(&caller, key, key_len)?;
            let value = headers(caller.data(), map)?
                .iter()
                .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(&key))
                .map(|(_, v)| v.clone())
                .ok_or(Status::NotFound)?;
            return_bytes(&mut caller, value.as_bytes(), ptr_out, size_out)
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_replace_header_map_value",
        |mut caller, map: u32, key: u32, key_len: u32, value: u32, value_len: u32| {
            let key = read_string(&caller, key, key_len)?.to_ascii_lowercase();
            let mut value = read_string(&caller, value, value_len)?;
            let headers = headers_mut(caller.data_mut(), map)?;
            // Like Envoy: the first entry takes the value, the others go.
            let mut found = false;
            headers.retain_mut(|(k, v)| {
                if !k.eq_ignore_ascii_case(&key) {
                    true
                } else if found {
                    false
                } else {
                    found = true;
                    *v = std::mem::take(&mut value);
                    true
                }
            });
            if !found {
                headers.push((key, value));
            }
            Ok(())
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_add_header_map_value",
        |mut caller, map: u32, key: u32, key_len: u32, value: u32, value_len: u32| {
            let key = read_string(&caller, key, key_len)?.to_ascii_lowercase();
            let value = read_string(&caller, value, value_len)?;
            headers_mut(caller.data_mut(), map)?.push((key, value));
            Ok(())
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_remove_header_map_value",
        |mut caller, map: u32, key: u32, key_len: u32| {
            let key = read(&caller, key, key_len)?;
            headers_mut(caller.data_mut(), map)?
                .retain(|(k, _)| !k.as_bytes().eq_ignore_ascii_case(&key));
            Ok(())
        }
    )?;
    Ok(())
}

fn define_metrics(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    proxy_fn!(
        linker,
        "proxy_define_metric",
        |mut caller, kind: u32, name: u32, name_len: u32, id_out: u32| {
            let kind = MetricKind::from_abi(kind).ok_or(Status::BadArgument)?;
            let name = read_string(&caller, name, name_len)?;
            let metrics = &mut caller.data_mut().metrics;
            let id = match metrics.iter().position(|m| m.name == name) {
                Some(id) if metrics[id].kind == kind => id,
                Some(_) => return Err(Status::BadArgument.into()),
                None => {
                    metrics.push(Metric {
                        name,
                        kind,
                        value: 0,
                        samples: Vec::new(),
                    });
                    metrics.len() - 1
                }
            };
            let id = u32::try_from(id).map_err(|_| Status::InternalFailure)?;
            write_u32(&mut caller, id_out, id)
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_increment_metric",
        |mut caller, id: u32, offset: i64| {
            let metric = metric_mut(caller.data_mut(), id)?;
            match metric.kind {
                MetricKind::Counter if offset < 0 => Err(Status::BadArgument.into()),
                MetricKind::Counter | MetricKind::Gauge => {
                    metric.value = metric.value.wrapping_add_signed(offset);
                    Ok(())
                }
                MetricKind::Histogram => Err(Status::BadArgument.into()),
            }
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_record_metric",
        |mut caller, id: u32, value: u64| {
            let metric = metric_mut(caller.data_mut(), id)?;
            match metric.kind {
                // A counter only grows (as in Envoy).
                MetricKind::Counter => metric.value = metric.value.max(value),
                MetricKind::Gauge => metric.value = value,
                MetricKind::Histogram => {
                    metric.value = value;
                    metric.samples.push(value);
                }
            }
            Ok(())
        }
    )?;
    proxy_fn!(
        linker,
        "proxy_get_metric",
        |mut caller, id: u32, value_out: u32| {
            let metric = metric_mut(caller.data_mut(), id)?;
            if metric.kind == MetricKind::Histogram {
                return Err(Status::BadArgument.into());
            }
            let value = metric.value;
            write_u64(&mut caller, value_out, value)
        }
    )?;
    Ok(())
}

fn define_wasi(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut caller: Caller<'_, State>, fd: u32, iovs: u32, iovs_len: u32, written_out: u32| {
            if fd != 1 && fd != 2 {
                return Ok(WASI_EBADF);
            }
            errno((|| {
                let iovs_size = iovs_len.checked_mul(8).ok_or(Status::InvalidMemoryAccess)?;
                let iovs = read(&caller, iovs, iovs_size)?;
                let mut data = Vec::new();
                for iov in iovs.chunks_exact(8) {
                    let [p0, p1, p2, p3, l0, l1, l2, l3] = iov else {
                        return Err(Status::InvalidMemoryAccess.into());
                    };
                    let ptr = u32::from_le_bytes([*p0, *p1, *p2, *p3]);
                    let len = u32::from_le_bytes([*l0, *l1, *l2, *l3]);
                    data.extend_from_slice(&read(&caller, ptr, len)?);
                }
                let written = u32::try_from(data.len()).map_err(|_| Status::BadArgument)?;
                let state = caller.data_mut();
                let sink = if fd == 1 {
                    &mut state.stdout
                } else {
                    &mut state.stderr
                };
                sink.extend_from_slice(&data);
                write_u32(&mut caller, written_out, written)
            })())
        },
    )?;
    for (sizes, get) in [
        ("environ_sizes_get", "environ_get"),
        ("args_sizes_get", "args_get"),
    ] {
        // No environment variables, no arguments.
        linker.func_wrap(
            WASI,
            sizes,
            |mut caller: Caller<'_, State>, count_out: u32, size_out: u32| {
                errno(
                    write_u32(&mut caller, count_out, 0)
                        .and_then(|()| write_u32(&mut caller, size_out, 0)),
                )
            },
        )?;
        linker.func_wrap(WASI, get, |_: Caller<'_, State>, _: u32, _: u32| Ok(0u32))?;
    }
    linker.func_wrap(
        WASI,
        "clock_time_get",
        |mut caller: Caller<'_, State>, _clock: u32, _precision: u64, time_out: u32| {
            errno(write_u64(&mut caller, time_out, now_nanos()))
        },
    )?;
    linker.func_wrap(
        WASI,
        "random_get",
        |mut caller: Caller<'_, State>, buf: u32, len: u32| {
            let mut bytes = Vec::with_capacity(len as usize);
            while bytes.len() < len as usize {
                bytes.extend_from_slice(&next_random(&mut caller.data_mut().random).to_le_bytes());
            }
            bytes.truncate(len as usize);
            errno(write(&mut caller, buf, &bytes))
        },
    )?;
    linker.func_wrap(WASI, "sched_yield", |_: Caller<'_, State>| Ok(0u32))?;
    linker.func_wrap(
        WASI,
        "proc_exit",
        |_: Caller<'_, State>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::from(GuestExit(code)))
        },
    )?;
    Ok(())
}

/// Defines every function `module` imports that `linker` lacks as a stub that
/// returns `Unimplemented` (or `ENOSYS` for WASI) and zero for other results,
/// so that any filter instantiates. Non-function imports are refused.
pub(crate) fn stub_missing(linker: &mut Linker<State>, module: &Module) -> Result<(), HostError> {
    let mut store = Store::new(module.engine(), State::default());
    for import in module.imports() {
        if linker
            .get(&mut store, import.module(), import.name())
            .is_ok()
        {
            continue;
        }
        let ExternType::Func(ty) = import.ty() else {
            return Err(HostError::UnsupportedImport {
                module: import.module().to_owned(),
                name: import.name().to_owned(),
            });
        };
        let code = if import.module() == WASI {
            WASI_ENOSYS
        } else {
            Status::Unimplemented as u32
        };
        let results: Vec<Val> = ty
            .results()
            .enumerate()
            .map(|(i, ty)| match ty {
                wasmtime::ValType::I32 if i == 0 => Val::I32(code.cast_signed()),
                ty => Val::default_for_ty(&ty).unwrap_or(Val::I32(0)),
            })
            .collect();
        linker
            .func_new(import.module(), import.name(), ty, move |_, _, out| {
                out.clone_from_slice(&results);
                Ok(())
            })
            .map_err(|e| HostError::Instantiate(e.into_boxed_dyn_error()))?;
    }
    Ok(())
}
