//! The HTTP API's error answer, `{"error": ..., "problems": [...], ...extra}`: one
//! shape for the API's own errors and the forwarder's (`forward`), below both.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use shardmap::Problem;

/// An error answer: `{"error": ..., "problems": [...], ...extra}`.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) error: String,
    pub(crate) problems: Vec<Problem>,
    pub(crate) extra: Vec<(&'static str, Value)>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: error.into(),
            problems: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// An error with a `code` a client acts on (e.g. `etcd_unavailable`: try
    /// another replica).
    pub(crate) fn coded(status: StatusCode, code: &str, error: impl Into<String>) -> ApiError {
        ApiError::new(status, error).with("code", json!(code))
    }

    /// The answer with `key` set to `value` beside `error` and `problems`.
    pub(crate) fn with(mut self, key: &'static str, value: Value) -> ApiError {
        self.extra.push((key, value));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error, "problems": self.problems });
        if let Some(obj) = body.as_object_mut() {
            for (k, v) in self.extra {
                obj.insert(k.to_owned(), v);
            }
        }
        (self.status, Json(body)).into_response()
    }
}
