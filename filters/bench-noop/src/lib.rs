//! The baseline of the filter benchmarks: a proxy-wasm filter that sets one
//! request header and continues, and does nothing else.
//!
//! It sets `x-dtable-server: dtable-server`, overwriting any value the client
//! sent. The plugin configuration may rename the header: `{"header": "x-foo"}`;
//! an empty configuration keeps the default.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

/// The header set when the configuration does not name one.
pub const DEFAULT_HEADER: &str = "x-dtable-server";
/// The value the filter gives the header.
pub const HEADER_VALUE: &str = "dtable-server";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(NoopRoot::default()));
}}

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    header: Option<String>,
}

/// Parses the plugin configuration and returns the header name to set.
fn header_name(configuration: Option<&[u8]>) -> Result<Rc<str>, String> {
    let config = match configuration {
        None => return Ok(DEFAULT_HEADER.into()),
        Some(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => {
            return Ok(DEFAULT_HEADER.into());
        }
        Some(bytes) => serde_json::from_slice::<Config>(bytes).map_err(|e| e.to_string())?,
    };
    match config.header {
        None => Ok(DEFAULT_HEADER.into()),
        Some(name) if name.is_empty() => Err("\"header\" must not be empty".to_owned()),
        Some(name) => Ok(name.to_ascii_lowercase().into()),
    }
}

/// The root context: holds the header name shared by every request.
struct NoopRoot {
    header: Rc<str>,
}

impl Default for NoopRoot {
    fn default() -> Self {
        Self {
            header: DEFAULT_HEADER.into(),
        }
    }
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let configuration = if plugin_configuration_size == 0 {
            None
        } else {
            self.get_plugin_configuration()
        };
        match header_name(configuration.as_deref()) {
            Ok(header) => {
                self.header = header;
                true
            }
            Err(error) => {
                proxy_wasm::hostcalls::log(
                    LogLevel::Error,
                    &format!("bench-noop: invalid plugin configuration: {error}"),
                )
                .ok();
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopHttp {
            header: Rc::clone(&self.header),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request: sets the header once.
struct NoopHttp {
    header: Rc<str>,
}

impl Context for NoopHttp {}

impl HttpContext for NoopHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_request_header(&self.header, Some(HEADER_VALUE));
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration() {
        assert_eq!(&*header_name(None).unwrap(), DEFAULT_HEADER);
        assert_eq!(&*header_name(Some(b" \n")).unwrap(), DEFAULT_HEADER);
        assert_eq!(&*header_name(Some(b"{}")).unwrap(), DEFAULT_HEADER);
        assert_eq!(
            &*header_name(Some(br#"{"header":"X-Foo"}"#)).unwrap(),
            "x-foo"
        );
        assert!(header_name(Some(br#"{"header":""}"#)).is_err());
        assert!(header_name(Some(br#"{"heder":"x"}"#)).is_err());
        assert!(header_name(Some(b"not json")).is_err());
    }
}
