//! Where the harness keeps things: the workspace root, its `.venv`, and `.ordo/testkit` for
//! locks (both directories are git-ignored).

use std::path::PathBuf;

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or(manifest)
}

/// The project-local virtual environment SecantusDB is installed into.
pub fn venv_dir() -> PathBuf {
    workspace_root().join(".venv")
}

/// Scratch directory for the harness's lock files.
pub fn state_dir() -> PathBuf {
    workspace_root().join(".ordo").join("testkit")
}
