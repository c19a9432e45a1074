//! A session's own folders (`workspace/`, `tmp/`) as an image carries them: copied for a
//! fork, read into an export or snapshot, written back on import and restore.

use std::path::Path;

use super::FileRecord;
use crate::{Error, Result};

/// The folders of a session that are its own and travel with it.
pub const OWN_DIRS: [&str; 2] = ["workspace", "tmp"];

/// Whether a session's own folders under `root` hold nothing (or cannot be read).
pub fn own_dirs_empty(root: &Path) -> bool {
    OWN_DIRS.iter().all(|d| {
        std::fs::read_dir(root.join(d)).map_or(true, |mut entries| entries.next().is_none())
    })
}

/// Copies a session's own folders from `from` into `to` (a fork's new session folder).
pub fn copy_dirs(from: &Path, to: &Path) -> Result<()> {
    fn copy(from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let target = to.join(entry.file_name());
            if kind.is_dir() {
                copy(&entry.path(), &target)?;
            } else if kind.is_file() {
                std::fs::copy(entry.path(), &target)?;
            } // symlinks are not followed, nor carried
        }
        Ok(())
    }
    for dir in OWN_DIRS {
        copy(&from.join(dir), &to.join(dir))
            .map_err(|e| Error::Io(format!("copying {}", from.join(dir).display()), e))?;
    }
    Ok(())
}

/// Reads a session's own folders into records, at most `limit` bytes of files.
pub fn read_dirs(root: &Path, limit: u64) -> Result<Vec<(FileRecord, Vec<u8>)>> {
    fn walk(
        root: &Path,
        rel: &str,
        out: &mut Vec<(FileRecord, Vec<u8>)>,
        budget: &mut u64,
    ) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue; // not UTF-8: the file API could not have made it either
            };
            let path = format!("{rel}/{name}");
            let kind = entry.file_type()?;
            if kind.is_dir() {
                out.push((
                    FileRecord {
                        path: path.clone(),
                        len: 0,
                        dir: true,
                    },
                    vec![],
                ));
                walk(root, &path, out, budget)?;
            } else if kind.is_file() {
                let data = std::fs::read(entry.path())?;
                *budget = budget.checked_sub(data.len() as u64).ok_or_else(|| {
                    std::io::Error::other("the session's files are over its workspace quota")
                })?;
                out.push((
                    FileRecord {
                        path,
                        len: data.len() as u64,
                        dir: false,
                    },
                    data,
                ));
            }
        }
        Ok(())
    }
    let mut out = vec![];
    let mut budget = limit;
    for dir in OWN_DIRS {
        walk(root, dir, &mut out, &mut budget)
            .map_err(|e| Error::Io(format!("reading {}", root.join(dir).display()), e))?;
    }
    Ok(out)
}

/// Writes records read by [`read_dirs`] under `root`; paths are checked to stay inside it.
pub fn write_dirs(root: &Path, files: &[(FileRecord, Vec<u8>)]) -> Result<()> {
    for (record, data) in files {
        let rel = Path::new(&record.path);
        let inside = rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
            && OWN_DIRS.iter().any(|d| rel.starts_with(d));
        if !inside {
            return Err(Error::BadSnapshot(format!(
                "a file path {:?} leaves the session",
                record.path
            )));
        }
        let target = root.join(rel);
        let written = if record.dir {
            std::fs::create_dir_all(&target)
        } else {
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&target, data))
        };
        written.map_err(|e| Error::Io(format!("writing {}", target.display()), e))?;
    }
    Ok(())
}
