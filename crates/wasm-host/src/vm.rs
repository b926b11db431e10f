//! Loading a filter ([`Host`]) and driving one instance of it ([`Vm`]).

use std::path::Path;

use wasmtime::{
    Config, Engine, Instance, InstancePre, Module, Store, Trap, TypedFunc, Val, WasmParams,
    WasmResults,
};

use crate::HostError;
use crate::abi::{Action, LogLevel};
use crate::imports::{self, GuestExit};
use crate::state::{Guest, LocalResponse, LogEntry, Metric, State, Stream};

/// The id the host gives the root context.
const ROOT_CONTEXT: u32 = 1;

/// A compiled filter, ready to be instantiated any number of times.
///
/// Compiling is the slow part (Cranelift); share one `Host` between tests.
pub struct Host {
    pre: InstancePre<State>,
    /// Shared data, common to every VM instantiated from this host.
    shared: crate::state::SharedData,
}

impl Host {
    /// Reads and compiles the `.wasm` file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, HostError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| HostError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Compiles a filter from its `.wasm` bytes and links the host functions.
    pub fn from_bytes(wasm: &[u8]) -> Result<Self, HostError> {
        let engine = Engine::new(&Config::new()).map_err(boxed(HostError::Compile))?;
        let module = Module::new(&engine, wasm).map_err(boxed(HostError::Compile))?;
        let abi = module.exports().any(|export| {
            matches!(
                export.name(),
                "proxy_abi_version_0_2_1" | "proxy_abi_version_0_2_0"
            )
        });
        if !abi {
            return Err(HostError::UnsupportedAbi);
        }
        let mut linker = imports::linker(&engine).map_err(boxed(HostError::Instantiate))?;
        imports::stub_missing(&mut linker, &module)?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(boxed(HostError::Instantiate))?;
        Ok(Self {
            pre,
            shared: Default::default(),
        })
    }

    /// Creates a fresh VM: a new instance with its own memory and records.
    /// Call [`Vm::start`] next.
    pub fn instantiate(&self) -> Result<Vm, HostError> {
        let state = State {
            shared: self.shared.clone(),
            ..State::default()
        };
        let mut store = Store::new(self.pre.module().engine(), state);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(boxed(HostError::Instantiate))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| HostError::MissingExport("memory".to_owned()))?;
        let allocate = match typed(&instance, &mut store, "proxy_on_memory_allocate")? {
            Some(allocate) => allocate,
            None => typed(&instance, &mut store, "malloc")?
                .ok_or_else(|| HostError::MissingExport("proxy_on_memory_allocate".to_owned()))?,
        };
        store.data_mut().guest = Some(Guest { memory, allocate });
        store.data_mut().root_context = ROOT_CONTEXT;
        let exports = Exports {
            initialize: match typed(&instance, &mut store, "_initialize")? {
                Some(initialize) => Some(initialize),
                None => typed(&instance, &mut store, "_start")?,
            },
            context_create: typed(&instance, &mut store, "proxy_on_context_create")?
                .ok_or_else(|| HostError::MissingExport("proxy_on_context_create".to_owned()))?,
            vm_start: typed(&instance, &mut store, "proxy_on_vm_start")?,
            configure: typed(&instance, &mut store, "proxy_on_configure")?,
            request_headers: typed(&instance, &mut store, "proxy_on_request_headers")?,
            done: typed(&instance, &mut store, "proxy_on_done")?,
            log: typed(&instance, &mut store, "proxy_on_log")?,
            delete: typed(&instance, &mut store, "proxy_on_delete")?,
        };
        Ok(Vm {
            runtime: Runtime {
                store,
                poisoned: false,
            },
            instance,
            exports,
            next_context: ROOT_CONTEXT + 1,
            started: false,
        })
    }
}

/// An HTTP context (one request/response stream) of a [`Vm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContextId(u32);

impl ContextId {
    /// The id the guest sees.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// The guest functions the host calls, looked up once.
struct Exports {
    initialize: Option<TypedFunc<(), ()>>,
    context_create: TypedFunc<(u32, u32), ()>,
    vm_start: Option<TypedFunc<(u32, u32), u32>>,
    configure: Option<TypedFunc<(u32, u32), u32>>,
    request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    done: Option<TypedFunc<u32, u32>>,
    log: Option<TypedFunc<u32, ()>>,
    delete: Option<TypedFunc<u32, ()>>,
}

/// One instance of a filter: one proxy-wasm VM with one root context, plus
/// what the filter did (header maps, local replies, logs, metrics, output).
///
/// After the guest traps or exits every call fails with
/// [`HostError::Poisoned`]: create a new `Vm`.
pub struct Vm {
    runtime: Runtime,
    instance: Instance,
    exports: Exports,
    next_context: u32,
    started: bool,
}

/// The store, and whether the guest is still trustworthy.
struct Runtime {
    store: Store<State>,
    poisoned: bool,
}

impl Vm {
    /// Starts the VM as Envoy does: `_initialize` (or `_start`), creates the
    /// root context and calls `proxy_on_vm_start`; returns what it returned.
    pub fn start(&mut self, vm_configuration: &[u8]) -> Result<bool, HostError> {
        if self.started {
            return Err(HostError::AlreadyStarted);
        }
        self.started = true;
        self.runtime.store.data_mut().vm_configuration = vm_configuration.to_vec();
        if let Some(initialize) = &self.exports.initialize {
            self.runtime
                .call("_initialize", ROOT_CONTEXT, initialize, ())?;
        }
        let create = &self.exports.context_create;
        self.runtime.call(
            "proxy_on_context_create",
            ROOT_CONTEXT,
            create,
            (ROOT_CONTEXT, 0),
        )?;
        self.runtime.root_verdict(
            "proxy_on_vm_start",
            self.exports.vm_start.as_ref(),
            vm_configuration.len(),
        )
    }

    /// Calls `proxy_on_configure` with this plugin configuration; returns the
    /// filter's verdict (`false`: Envoy would refuse the configuration).
    pub fn configure(&mut self, plugin_configuration: &[u8]) -> Result<bool, HostError> {
        self.ensure_started()?;
        self.runtime.store.data_mut().plugin_configuration = plugin_configuration.to_vec();
        self.runtime.root_verdict(
            "proxy_on_configure",
            self.exports.configure.as_ref(),
            plugin_configuration.len(),
        )
    }

    /// Creates an HTTP context (`proxy_on_context_create`) for one request.
    pub fn new_http_context(&mut self) -> Result<ContextId, HostError> {
        self.ensure_started()?;
        let id = self.next_context;
        self.next_context = id.checked_add(1).ok_or(HostError::TooManyContexts)?;
        self.runtime
            .store
            .data_mut()
            .streams
            .insert(id, Stream::default());
        let create = &self.exports.context_create;
        if let Err(error) =
            self.runtime
                .call("proxy_on_context_create", id, create, (id, ROOT_CONTEXT))
        {
            self.runtime.store.data_mut().streams.remove(&id);
            return Err(error);
        }
        Ok(ContextId(id))
    }

    /// Sets the request headers of `context` to `headers` and calls
    /// `proxy_on_request_headers`. The map as the filter left it is then
    /// available from [`Vm::request_headers_of`].
    pub fn request_headers(
        &mut self,
        context: ContextId,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let stream = self
            .runtime
            .store
            .data_mut()
            .streams
            .get_mut(&context.0)
            .ok_or(HostError::UnknownContext(context.0))?;
        stream.maps[0] = headers
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let Some(on_headers) = &self.exports.request_headers else {
            return Ok(Action::Continue);
        };
        let count = len_u32(headers.len());
        let action = self.runtime.call(
            "proxy_on_request_headers",
            context.0,
            on_headers,
            (context.0, count, u32::from(end_of_stream)),
        )?;
        Ok(Action::from(action))
    }

    /// Calls `proxy_on_done`; returns whether the context is done.
    pub fn done(&mut self, context: ContextId) -> Result<bool, HostError> {
        self.ensure_context(context)?;
        match &self.exports.done {
            Some(done) => Ok(self
                .runtime
                .call("proxy_on_done", context.0, done, context.0)?
                != 0),
            None => Ok(true),
        }
    }

    /// Calls `proxy_on_log` (Envoy calls it after `proxy_on_done`).
    pub fn log(&mut self, context: ContextId) -> Result<(), HostError> {
        self.ensure_context(context)?;
        match &self.exports.log {
            Some(log) => self.runtime.call("proxy_on_log", context.0, log, context.0),
            None => Ok(()),
        }
    }

    /// Calls `proxy_on_delete` and forgets the context and its records.
    pub fn delete(&mut self, context: ContextId) -> Result<(), HostError> {
        self.ensure_context(context)?;
        let result = match &self.exports.delete {
            Some(delete) => self
                .runtime
                .call("proxy_on_delete", context.0, delete, context.0),
            None => Ok(()),
        };
        self.runtime.store.data_mut().streams.remove(&context.0);
        result
    }

    /// Ends a stream as Envoy does: [`done`](Vm::done), [`log`](Vm::log),
    /// [`delete`](Vm::delete).
    pub fn finish(&mut self, context: ContextId) -> Result<(), HostError> {
        self.done(context)?;
        self.log(context)?;
        self.delete(context)
    }

    /// Calls `proxy_on_tick` on the root context, as Envoy does every tick period.
    pub fn tick(&mut self) -> Result<(), HostError> {
        self.ensure_started()?;
        self.call_export("proxy_on_tick", &[Val::I32(ROOT_CONTEXT as i32)])
            .map(|_| ())
    }

    /// Calls any export of the filter with raw arguments, in the root context.
    pub fn call_export(&mut self, name: &str, args: &[Val]) -> Result<Vec<Val>, HostError> {
        let func = self
            .instance
            .get_func(&mut self.runtime.store, name)
            .ok_or_else(|| HostError::MissingExport(name.to_owned()))?;
        let mut results = vec![Val::I32(0); func.ty(&self.runtime.store).results().len()];
        self.runtime.guarded(name, ROOT_CONTEXT, |store| {
            func.call(store, args, &mut results)
        })?;
        Ok(results)
    }

    /// The request headers of `context` as the filter left them; `None` for an
    /// unknown (or deleted) context.
    pub fn request_headers_of(&self, context: ContextId) -> Option<&[(String, String)]> {
        Some(&self.runtime.store.data().streams.get(&context.0)?.maps[0])
    }

    /// The first value of request header `name` (case-insensitive) of `context`.
    pub fn request_header(&self, context: ContextId, name: &str) -> Option<&str> {
        self.request_headers_of(context)?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The local reply the filter sent on `context`, if any.
    pub fn local_response(&self, context: ContextId) -> Option<&LocalResponse> {
        self.runtime
            .store
            .data()
            .streams
            .get(&context.0)?
            .local_response
            .as_ref()
    }

    /// Everything the filter logged since the start or [`Vm::clear_records`].
    pub fn logs(&self) -> &[LogEntry] {
        &self.runtime.store.data().logs
    }

    /// The messages logged at `level` or above.
    pub fn logs_at_least(&self, level: LogLevel) -> impl Iterator<Item = &str> {
        self.logs()
            .iter()
            .filter(move |entry| entry.level >= level)
            .map(|entry| entry.message.as_str())
    }

    /// The metrics the filter defined, in order of definition.
    pub fn metrics(&self) -> &[Metric] {
        &self.runtime.store.data().metrics
    }

    /// The metric called `name`.
    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics().iter().find(|metric| metric.name == name)
    }

    /// The tick period the filter asked for, in milliseconds (0: none).
    pub fn tick_period_ms(&self) -> u32 {
        self.runtime.store.data().tick_period_ms
    }

    /// What the guest wrote to stdout.
    pub fn stdout(&self) -> &[u8] {
        &self.runtime.store.data().stdout
    }

    /// What the guest wrote to stderr.
    pub fn stderr(&self) -> &[u8] {
        &self.runtime.store.data().stderr
    }

    /// Forgets logs and stdout/stderr output. Metrics (the filter's state)
    /// and the streams' header maps stay.
    pub fn clear_records(&mut self) {
        let state = self.runtime.store.data_mut();
        state.logs.clear();
        state.stdout.clear();
        state.stderr.clear();
    }

    fn ensure_started(&self) -> Result<(), HostError> {
        if self.started {
            Ok(())
        } else {
            Err(HostError::NotStarted)
        }
    }

    fn ensure_context(&self, context: ContextId) -> Result<(), HostError> {
        if self.runtime.store.data().streams.contains_key(&context.0) {
            Ok(())
        } else {
            Err(HostError::UnknownContext(context.0))
        }
    }
}

impl Runtime {
    /// Calls a typed export with `context` as the effective context.
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &str,
        context: u32,
        func: &TypedFunc<P, R>,
        params: P,
    ) -> Result<R, HostError> {
        self.guarded(name, context, |store| func.call(store, params))
    }

    /// Calls the root context's `proxy_on_vm_start` or `proxy_on_configure`
    /// with the configuration's size; `false` if it refused (returned 0), `true`
    /// if the filter does not export it.
    fn root_verdict(
        &mut self,
        name: &str,
        func: Option<&TypedFunc<(u32, u32), u32>>,
        size: usize,
    ) -> Result<bool, HostError> {
        match func {
            Some(func) => {
                let ok = self.call(name, ROOT_CONTEXT, func, (ROOT_CONTEXT, len_u32(size)))?;
                Ok(ok != 0)
            }
            None => Ok(true),
        }
    }

    /// Runs a guest call; turns traps and exits into errors and poisons the VM.
    fn guarded<R>(
        &mut self,
        name: &str,
        context: u32,
        call: impl FnOnce(&mut Store<State>) -> wasmtime::Result<R>,
    ) -> Result<R, HostError> {
        if self.poisoned {
            return Err(HostError::Poisoned);
        }
        let state = self.store.data_mut();
        state.effective_context = context;
        let (logs_before, stderr_before) = (state.logs.len(), state.stderr.len());
        call(&mut self.store).map_err(|error| {
            self.poisoned = true;
            let state = self.store.data();
            let mut said: Vec<String> = state
                .logs
                .get(logs_before..)
                .unwrap_or_default()
                .iter()
                .filter(|entry| entry.level == LogLevel::Critical)
                .map(|entry| entry.message.clone())
                .collect();
            let stderr =
                String::from_utf8_lossy(state.stderr.get(stderr_before..).unwrap_or_default());
            if !stderr.trim().is_empty() {
                said.push(stderr.trim().to_owned());
            }
            guest_error(name, error, said.join("\n"))
        })
    }
}

fn guest_error(function: &str, error: wasmtime::Error, guest_output: String) -> HostError {
    let function = function.to_owned();
    if let Some(GuestExit(code)) = error.downcast_ref::<GuestExit>() {
        return HostError::Exit {
            function,
            code: *code,
        };
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return HostError::Trap {
            function,
            trap: *trap,
            guest_output,
        };
    }
    HostError::Call {
        function,
        source: error.into_boxed_dyn_error(),
    }
}

/// An optional export with the given signature; a wrong signature is an error.
fn typed<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<State>,
    name: &'static str,
) -> Result<Option<TypedFunc<P, R>>, HostError> {
    let Some(func) = instance.get_func(&mut *store, name) else {
        return Ok(None);
    };
    func.typed(&*store)
        .map(Some)
        .map_err(|error| HostError::ExportType {
            name,
            source: error.into_boxed_dyn_error(),
        })
}

fn boxed(
    variant: fn(Box<dyn std::error::Error + Send + Sync>) -> HostError,
) -> impl Fn(wasmtime::Error) -> HostError {
    move |error| variant(error.into_boxed_dyn_error())
}

/// Sizes handed to a wasm32 guest.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}
