//! The private data folder a manager makes when it is given none, and the ones that managers
//! killed before they could remove theirs left behind.
//!
//! Each is `arl-manager-XXXXXX` in the temporary folder, with a `pid` file naming its owner,
//! so that a later manager can tell a dead owner's folder from a running one's.

use std::path::Path;

use crate::{Error, Result};

const PREFIX: &str = "arl-manager-";

/// A temporary folder removed when the manager stops, marked with its process id.
pub(super) struct PrivateDir(tempfile::TempDir);

impl PrivateDir {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir()
            .map_err(|e| Error::Io("creating the data folder".into(), e))?;
        std::fs::write(dir.path().join("pid"), std::process::id().to_string())
            .map_err(|e| Error::Io("marking the data folder".into(), e))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Removes the private folders whose owner is no longer running; how many.
pub(super) fn sweep_dead() -> usize {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
        .filter(|e| {
            let pid = std::fs::read_to_string(e.path().join("pid"));
            // A folder without a mark may be one being made: left alone.
            pid.ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        })
        .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
        .count()
}
