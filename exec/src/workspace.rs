//! The folder commands run in, and the only one the agent's file operations touch. Paths are
//! checked twice: by their words (no `..` above the workspace, no other absolute path), then
//! by `cap-std`, which opens every file beneath the workspace's own descriptor and refuses a
//! symlink that leads out of it.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use cap_std::fs::Dir;

use crate::error::{ExecError, Kind, Result};
use crate::patch;

/// Where the workspace is mounted in a runtime container; paths may name it.
pub const MOUNT: &str = "/workspace";

/// The workspace on the host, and a capability for it.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    dir: Dir,
}

impl Workspace {
    /// Opens `root`, creating it if needed.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let dir = Dir::open_ambient_dir(&root, cap_std::ambient_authority())?;
        Ok(Self { root, dir })
    }

    /// The workspace's host path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host path of the folder `path` names (relative to the workspace, or under
    /// [`MOUNT`] or the workspace's host path), which must exist: a command's working folder.
    pub fn folder(&self, path: &str) -> Result<PathBuf> {
        let relative = relative(Path::new(""), path)?;
        let host = self.root.join(&relative);
        let resolved = host.canonicalize().map_err(|_| {
            ExecError::new(
                Kind::NotFound,
                "file_not_found",
                format!("working folder `{path}` does not exist in the workspace"),
            )
        })?;
        if !resolved.starts_with(&self.root) {
            return Err(escapes(path));
        }
        if !resolved.is_dir() {
            return Err(ExecError::invalid(
                "invalid_path",
                format!("working folder `{path}` is not a folder"),
            ));
        }
        Ok(resolved)
    }

    /// Writes `files` and applies `patch` under `base`: every path is checked and every hunk
    /// applied in memory first, so a request that fails anywhere changes nothing.
    pub fn update(
        &self,
        base: &str,
        files: &BTreeMap<String, String>,
        diff: &str,
    ) -> Result<String> {
        let base = relative(Path::new(""), base)?;
        let mut writes: BTreeMap<PathBuf, Option<String>> = BTreeMap::new();
        for (path, content) in files {
            writes.insert(relative(&base, path)?, Some(content.clone()));
        }
        let mut patched = 0;
        if !diff.trim().is_empty() {
            for file in patch::parse(diff)? {
                let target = relative(&base, file.path())?;
                let original = match writes.get(&target) {
                    Some(Some(written)) => written.clone(),
                    Some(None) => String::new(),
                    None if file.creates() => String::new(),
                    None => self.read(&target, file.path())?,
                };
                let result = file.apply(&original)?;
                writes.insert(target, result);
                patched += 1;
            }
        }
        for (path, content) in &writes {
            self.write(path, content.as_deref())?;
        }
        Ok(format!("wrote {} file(s), patched {patched}", files.len()))
    }

    fn read(&self, path: &Path, named: &str) -> Result<String> {
        self.dir.read_to_string(path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => ExecError::new(
                Kind::Unprocessable,
                "patch_failed",
                format!("the patch changes `{named}`, which does not exist"),
            ),
            _ => io_refusal(named, &e),
        })
    }

    /// Writes (or, for `None`, removes) one file, making its folders.
    fn write(&self, path: &Path, content: Option<&str>) -> Result<()> {
        let shown = path.display().to_string();
        match content {
            Some(content) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    self.dir
                        .create_dir_all(parent)
                        .map_err(|e| io_refusal(&shown, &e))?;
                }
                self.dir
                    .write(path, content)
                    .map_err(|e| io_refusal(&shown, &e))
            }
            None => match self.dir.remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io_refusal(&shown, &e)),
                _ => Ok(()),
            },
        }
    }

    /// The bytes of the file `path` names.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let rel = relative(Path::new(""), path)?;
        self.dir.read(&rel).map_err(|e| match e.kind() {
            ErrorKind::NotFound => ExecError::new(
                Kind::NotFound,
                "file_not_found",
                format!("`{path}` does not exist in the workspace"),
            ),
            _ => io_refusal(path, &e),
        })
    }

    /// Writes `bytes` to `path` whole (a partial file beside it, renamed into place), making
    /// its folders; whether it replaced a file.
    pub fn write_file(&self, path: &str, bytes: &[u8]) -> Result<bool> {
        let rel = relative(Path::new(""), path)?;
        let Some(name) = rel.file_name() else {
            return Err(ExecError::invalid(
                "invalid_path",
                format!("`{path}` names no file"),
            ));
        };
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.dir
                .create_dir_all(parent)
                .map_err(|e| io_refusal(path, &e))?;
        }
        let replaced = self.dir.symlink_metadata(&rel).is_ok();
        let partial = rel.with_file_name(format!(".{}.arl-partial", name.to_string_lossy()));
        self.dir
            .write(&partial, bytes)
            .map_err(|e| io_refusal(path, &e))?;
        self.dir.rename(&partial, &self.dir, &rel).map_err(|e| {
            let _ = self.dir.remove_file(&partial);
            io_refusal(path, &e)
        })?;
        Ok(replaced)
    }

    /// Removes the file or folder `path` names, a folder with what it holds.
    pub fn remove(&self, path: &str) -> Result<()> {
        let rel = relative(Path::new(""), path)?;
        if rel.as_os_str().is_empty() {
            return Err(ExecError::invalid(
                "invalid_path",
                "the workspace itself cannot be removed",
            ));
        }
        let meta = self.dir.symlink_metadata(&rel).map_err(|_| {
            ExecError::new(
                Kind::NotFound,
                "file_not_found",
                format!("`{path}` does not exist"),
            )
        })?;
        let gone = if meta.is_dir() {
            self.dir.remove_dir_all(&rel)
        } else {
            self.dir.remove_file(&rel)
        };
        gone.map_err(|e| io_refusal(path, &e))
    }

    /// The entries of the folder `path` names, by name: (name, is a folder, size).
    pub fn list(&self, path: &str) -> Result<Vec<(String, bool, u64)>> {
        let rel = relative(Path::new(""), path)?;
        let dir = if rel.as_os_str().is_empty() {
            self.dir
                .try_clone()
                .map_err(|e| ExecError::internal("listing a folder", e))?
        } else {
            self.dir.open_dir(&rel).map_err(|e| match e.kind() {
                ErrorKind::NotFound => ExecError::new(
                    Kind::NotFound,
                    "file_not_found",
                    format!("`{path}` does not exist"),
                ),
                _ => io_refusal(path, &e),
            })?
        };
        let entries = dir.entries().map_err(|e| io_refusal(path, &e))?;
        let mut all: Vec<_> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let meta = e.metadata().ok()?;
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    meta.is_dir(),
                    meta.len(),
                ))
            })
            .collect();
        all.sort();
        Ok(all)
    }

    /// Removes everything in the workspace (the folder itself stays): how many entries went.
    pub fn empty(&self) -> Result<usize> {
        let entries = self
            .dir
            .entries()
            .map_err(|e| ExecError::internal("listing the workspace", e))?;
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| ExecError::internal("listing the workspace", e))?;
            let name = entry.file_name();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let gone = if is_dir {
                self.dir.remove_dir_all(&name)
            } else {
                self.dir.remove_file(&name)
            };
            gone.map_err(|e| ExecError::internal("emptying the workspace", e))?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// `path` under `base`, by its words: relative, or absolute under [`MOUNT`]; never above the
/// workspace.
pub fn relative(base: &Path, path: &str) -> Result<PathBuf> {
    if path.contains('\0') {
        return Err(ExecError::invalid(
            "invalid_path",
            "a path holds a NUL byte",
        ));
    }
    let inside = match path.strip_prefix(MOUNT) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
        _ if path.starts_with('/') => return Err(escapes(path)),
        _ => path,
    };
    let mut out = base.to_path_buf();
    for component in Path::new(inside).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err(escapes(path));
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(escapes(path)),
        }
    }
    Ok(out)
}

fn escapes(path: &str) -> ExecError {
    ExecError::invalid(
        "invalid_path",
        format!("`{path}` is outside the workspace ({MOUNT})"),
    )
}

/// An I/O failure on a file a client named: a path cap-std refused (it leads out of the
/// workspace) is the client's, anything else the agent's.
fn io_refusal(path: &str, e: &std::io::Error) -> ExecError {
    match e.kind() {
        ErrorKind::PermissionDenied => ExecError::invalid(
            "invalid_path",
            format!("`{path}` leads outside the workspace or may not be written"),
        ),
        ErrorKind::NotADirectory | ErrorKind::IsADirectory | ErrorKind::AlreadyExists => {
            ExecError::invalid("invalid_path", format!("`{path}`: {e}"))
        }
        _ => ExecError::internal("writing a file", e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn paths_stay_in_the_workspace_by_their_words() {
        let ok = |b: &str, p: &str| relative(Path::new(b), p).unwrap();
        assert_eq!(ok("", "a/b.txt"), PathBuf::from("a/b.txt"));
        assert_eq!(ok("src", "./x/../y.rs"), PathBuf::from("src/y.rs"));
        assert_eq!(ok("", "/workspace/a"), PathBuf::from("a"));
        assert_eq!(ok("", "/workspace"), PathBuf::from(""));
        for bad in ["../x", "/etc/passwd", "a/../../x", "/workspacex/a", "a\0b"] {
            assert_eq!(
                relative(Path::new(""), bad).unwrap_err().code,
                "invalid_path",
                "{bad}"
            );
        }
        assert!(relative(Path::new("src"), "../../x").is_err());
    }

    #[test]
    fn a_symlink_out_of_the_workspace_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("out")).unwrap();
        let ws = Workspace::open(tmp.path()).unwrap();
        let files = BTreeMap::from([("out/x.txt".to_owned(), "no".to_owned())]);
        let e = ws.update("", &files, "").unwrap_err();
        assert_eq!(e.code, "invalid_path", "{e}");
        assert!(!outside.path().join("x.txt").exists());
        assert_eq!(ws.folder("out").unwrap_err().code, "invalid_path");
    }
}
