//! Finding (and building) the `.wasm` of a filter of this workspace.

use std::collections::HashMap;
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use crate::HostError;

/// Filters already built by this process: package → artifact.
static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// Builds the filter `package` of this workspace for `wasm32-wasip1` with the
/// `wasm` profile and returns the path of its `.wasm`:
/// `$CARGO_TARGET_DIR/wasm32-wasip1/wasm/<package with '-' → '_'>.wasm`
/// (`<workspace>/target` when `CARGO_TARGET_DIR` is unset; a relative one is
/// taken from the workspace root).
///
/// Cargo runs once per package and process (`$CARGO`, else `cargo`), so the
/// artifact is never stale; when it is fresh that costs a fraction of a second.
pub fn built_filter(package: &str) -> Result<PathBuf, HostError> {
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(package) {
        return Ok(path.clone());
    }
    let workspace = workspace_root();
    let target_dir = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    let artifact = target_dir
        .join("wasm32-wasip1")
        .join("wasm")
        .join(format!("{}.wasm", package.replace('-', "_")));
    let build_error = |detail: String| HostError::Build {
        package: package.to_owned(),
        detail,
    };
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["build", "--package", package])
        .args(["--target", "wasm32-wasip1", "--profile", "wasm"])
        .output()
        .map_err(|error| build_error(format!("cannot run cargo: {error}")))?;
    if !output.status.success() {
        return Err(build_error(format!(
            "cargo build failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    if !artifact.is_file() {
        return Err(build_error(format!(
            "{} was not produced",
            artifact.display()
        )));
    }
    built.insert(package.to_owned(), artifact.clone());
    Ok(artifact)
}

/// The workspace root: this crate lives in `<root>/crates/wasm-host`.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest_dir)
        .to_owned()
}
