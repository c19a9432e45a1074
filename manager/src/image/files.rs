//! A session's own folders (`workspace/`, `tmp/`) as an image carries them: copied for a
//! fork, read into an export or snapshot, written back on import and restore.
//!
//! The guest owns these folders and may change them while they are read (its next turn runs
//! meanwhile), so they are walked by descriptor, never by host path: each entry is opened
//! relative to its folder's descriptor with `O_NOFOLLOW`, and its kind is taken from the
//! opened descriptor (`fstat`), not from the listing. A symlink, whether the guest made it or
//! swapped it in after the listing, is never followed, so nothing outside the session's
//! folders can be read into a fork or an export. Symlinks are not carried.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

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

/// What a walk finds: a folder, or a regular file opened for reading with its size.
enum Found {
    Dir,
    File(File, u64),
}

/// Opens `name` in the folder `dir` without following a symlink; `None` for a symlink or
/// anything that is neither a folder nor a regular file.
fn open_entry(dir: impl AsFd, name: &CStr) -> io::Result<Option<(OwnedFd, FileType, u64)>> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        // A symlink (or a name that vanished since the listing): not carried.
        Err(Errno::LOOP | Errno::NOENT | Errno::NXIO) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let stat = rustix::fs::fstat(&fd)?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    Ok(matches!(kind, FileType::Directory | FileType::RegularFile).then_some((fd, kind, size)))
}

/// Calls `visit` for every folder and regular file under the session's own folders in `root`,
/// by name within each folder, with paths relative to `root` (`workspace/a/b`).
fn walk(root: &Path, visit: &mut dyn FnMut(&str, Found) -> io::Result<()>) -> io::Result<()> {
    fn walk_dir(
        dir: &OwnedFd,
        rel: &str,
        visit: &mut dyn FnMut(&str, Found) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(dir)? {
            let name = entry?.file_name().to_owned();
            if name.as_bytes() != b"." && name.as_bytes() != b".." {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            let Ok(text) = name.to_str() else {
                continue; // not UTF-8: the file API could not have made it either
            };
            let path = format!("{rel}/{text}");
            match open_entry(dir, &name)? {
                Some((fd, FileType::Directory, _)) => {
                    visit(&path, Found::Dir)?;
                    walk_dir(&fd, &path, visit)?;
                }
                Some((fd, _, size)) => visit(&path, Found::File(File::from(fd), size))?,
                None => {}
            }
        }
        Ok(())
    }
    let top = File::open(root)?;
    for own in OWN_DIRS {
        let name = std::ffi::CString::new(own).map_err(io::Error::other)?;
        if let Some((fd, FileType::Directory, _)) = open_entry(&top, &name)? {
            walk_dir(&fd, own, visit)?;
        }
    }
    Ok(())
}

/// The error for a session whose files pass `limit`.
fn over_quota(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("the session's files are over its limit of {limit} bytes"),
    )
}

/// A walk's failure as the core tells it: over the limit is a refusal, the rest an I/O error.
fn walk_error(what: &str, limit: u64) -> impl FnOnce(io::Error) -> Error {
    move |e| match e.kind() {
        io::ErrorKind::FileTooLarge => Error::QuotaExceeded(limit),
        _ => Error::Io(what.to_owned(), e),
    }
}

/// Copies a session's own folders from `from` into `to` (a fork's new session folder, which
/// no guest sees yet), at most `limit` bytes of files.
pub fn copy_dirs(from: &Path, to: &Path, limit: u64) -> Result<()> {
    let mut budget = limit;
    for own in OWN_DIRS {
        let dir = to.join(own);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
    }
    let mut copy = |rel: &str, found: Found| -> io::Result<()> {
        let target = to.join(rel);
        match found {
            Found::Dir => std::fs::create_dir_all(&target),
            Found::File(file, size) => {
                budget = budget.checked_sub(size).ok_or_else(|| over_quota(limit))?;
                let mut out = File::create(&target)?;
                // At most what it held when opened: a file the guest grows meanwhile is cut.
                io::copy(&mut file.take(size), &mut out).map(drop)
            }
        }
    };
    walk(from, &mut copy).map_err(walk_error("copying the session's files", limit))
}

/// Reads a session's own folders into records, at most `limit` bytes of files: each file's
/// size is checked against what is left before it is read.
pub fn read_dirs(root: &Path, limit: u64) -> Result<Vec<(FileRecord, Vec<u8>)>> {
    let mut out = vec![];
    let mut budget = limit;
    let mut read = |rel: &str, found: Found| -> io::Result<()> {
        let (dir, data) = match found {
            Found::Dir => (true, vec![]),
            Found::File(file, size) => {
                budget = budget.checked_sub(size).ok_or_else(|| over_quota(limit))?;
                let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                // At most what it held when opened: a file the guest grows meanwhile is cut.
                file.take(size).read_to_end(&mut data)?;
                (false, data)
            }
        };
        let record = FileRecord {
            path: rel.to_owned(),
            len: data.len() as u64,
            dir,
        };
        out.push((record, data));
        Ok(())
    };
    walk(root, &mut read).map_err(walk_error("reading the session's files", limit))?;
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
        written.map_err(|e| Error::Io(format!("writing {}", record.path), e))?;
    }
    Ok(())
}
