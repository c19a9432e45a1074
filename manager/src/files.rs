//! A session's workspace as clients see it: the files under the guest's `/workspace`.
//!
//! Every path goes through a capability handle on the workspace folder (cap-std, the crate
//! WASI itself uses), so that neither `..`, an absolute path nor a symlink the guest made can
//! lead outside it. Uploads are staged beside the workspace and renamed into place whole, so
//! the guest never sees half a file.
//!
//! One per-session quota bounds what the session's files hold, `/workspace` and `/tmp`
//! together, whoever wrote them: uploads are counted as they arrive and again as they move
//! into place; the guest's own writes are counted by the session's task, at the end of every
//! turn and while a long one runs (see [`Workspace::recount`]).

use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::{Error, Result};

/// Chunks a download is read and sent in (HTTP body frames, gRPC `FileChunk`s).
pub const READ_CHUNK: usize = 256 << 10;

/// The longest path a client may name.
const MAX_PATH_BYTES: usize = 4096;

/// Files and folders a session may hold, whatever their size: a million empty files cost the
/// node inodes and every count a long walk.
pub const MAX_ENTRIES: u64 = 100_000;

/// What a workspace entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
        }
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the workspace, `/`-separated.
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

/// The workspace of one session, with its `/tmp`, its upload staging folder and its quota.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    tmp: PathBuf,
    staging: PathBuf,
    quota: u64,
    /// The last count found the files past the quota: no turn runs until some are deleted.
    over: AtomicBool,
    uploads: AtomicU64,
    /// Held while an upload is counted against the quota and moved into place, so that
    /// uploads in parallel cannot each fill the room that only one of them may take.
    committing: Mutex<()>,
}

/// An upload being written: a staged file, renamed into the workspace by [`Workspace::commit`].
#[derive(Debug)]
pub struct Upload {
    /// Bytes this upload may hold before the quota is passed.
    pub budget: u64,
    /// Whether it replaces a file already there.
    pub replaces: bool,
    staged: String,
    path: String,
}

impl Workspace {
    /// Opens the workspace folder `root` beside the guest's `tmp`, staging uploads in
    /// `staging` (outside the guest's view), with `quota` bytes for the two folders' files.
    ///
    /// The folders are opened for each operation rather than held: a session then costs no
    /// file descriptors beyond its WASI preopens, which matters at ten thousand sessions.
    pub fn open(root: &Path, tmp: &Path, staging: &Path, quota: u64) -> Result<Self> {
        let this = Self {
            root: root.to_owned(),
            tmp: tmp.to_owned(),
            staging: staging.to_owned(),
            quota,
            over: AtomicBool::new(false),
            uploads: AtomicU64::new(0),
            committing: Mutex::new(()),
        };
        this.root()?;
        this.staging()?;
        Ok(this)
    }

    fn root(&self) -> Result<Dir> {
        open_dir(&self.root)
    }

    fn staging(&self) -> Result<Dir> {
        open_dir(&self.staging)
    }

    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Bytes held by the session's files in `/workspace` and `/tmp` (a symlink counts its own
    /// size, not its target's). Past [`MAX_ENTRIES`] files and folders the count stops and
    /// answers `u64::MAX`: over any quota.
    pub fn usage(&self) -> Result<u64> {
        fn walk(dir: &Dir, entries: &mut u64) -> io::Result<u64> {
            let mut total = 0u64;
            for entry in dir.entries()? {
                let entry = entry?;
                *entries += 1;
                if *entries > MAX_ENTRIES {
                    return Ok(u64::MAX);
                }
                // The entry's own metadata: a symlink is never followed.
                let meta = entry.metadata()?;
                let size = if meta.is_dir() {
                    walk(&entry.open_dir()?, entries)?
                } else {
                    meta.len()
                };
                total = total.saturating_add(size);
            }
            Ok(total)
        }
        let mut entries = 0;
        let measure = |dir: &PathBuf, entries: &mut u64| {
            walk(&open_dir(dir)?, entries).map_err(|e| Error::Io("measuring the files".into(), e))
        };
        let files = measure(&self.root, &mut entries)?;
        Ok(files.saturating_add(measure(&self.tmp, &mut entries)?))
    }

    /// Counts the files again and remembers whether they are past the quota; answers the
    /// count. The session's task calls this after each turn (and while a long one runs), the
    /// files API after each delete.
    pub fn recount(&self) -> Result<u64> {
        let used = self.usage()?;
        self.over.store(used > self.quota, Ordering::Relaxed);
        Ok(used)
    }

    /// Empties the guest's `/tmp` (without following a link out of it) and counts again: what a
    /// turn stopped at the quota left there is scratch no later turn can count on.
    pub fn clear_tmp(&self) -> Result<u64> {
        let tmp = open_dir(&self.tmp)?;
        let entries = tmp
            .entries()
            .map_err(|e| Error::Io("listing /tmp".into(), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let removed = match entry.file_type() {
                Ok(kind) if kind.is_dir() => tmp.remove_dir_all(&name),
                _ => tmp.remove_file(&name),
            };
            removed.map_err(|e| Error::Io("emptying /tmp".into(), e))?;
        }
        self.recount()
    }

    /// Refuses a turn while the last count found the files past the quota.
    pub fn check_room(&self) -> Result<()> {
        if self.over.load(Ordering::Relaxed) {
            return Err(Error::DiskFull(self.quota));
        }
        Ok(())
    }

    /// Starts an upload to `path`: checks the path and how much room the quota leaves
    /// (counting a file it replaces as freed), and opens the staged file to write to.
    pub fn begin(&self, path: &str) -> Result<(Upload, std::fs::File)> {
        let rel = check(path)?;
        let replaced = match self.root()?.symlink_metadata(rel) {
            Ok(meta) if meta.is_dir() => return Err(Error::BadPath(path.into(), "is a folder")),
            Ok(meta) => Some(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(fs_error(path, e)),
        };
        let used = self.usage()?.saturating_sub(replaced.unwrap_or(0));
        let free = self.quota.saturating_sub(used);
        let n = self.uploads.fetch_add(1, Ordering::Relaxed);
        let staged = format!("upload-{n}");
        let file = self
            .staging()?
            .create(&staged)
            .map_err(|e| Error::Io("staging an upload".into(), e))?
            .into_std();
        let upload = Upload {
            budget: free,
            replaces: replaced.is_some(),
            staged,
            path: path.to_owned(),
        };
        Ok((upload, file))
    }

    /// Moves a finished upload into place, making missing folders on the way. The quota is
    /// checked again here, one commit at a time, with the workspace as it is now: uploads
    /// that ran side by side each saw the room left when they began.
    pub fn commit(&self, upload: Upload) -> Result<Entry> {
        let Upload { staged, path, .. } = upload;
        let _one_at_a_time = self
            .committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = (|| {
            let rel = check(&path)?;
            let (root, staging) = (self.root()?, self.staging()?);
            let size = staging
                .metadata(&staged)
                .map_err(|e| Error::Io("measuring an upload".into(), e))?
                .len();
            let replaced = match root.symlink_metadata(rel) {
                Ok(meta) if meta.is_file() => meta.len(),
                _ => 0,
            };
            let used = self.usage()?.saturating_sub(replaced);
            if used.saturating_add(size) > self.quota {
                return Err(Error::QuotaExceeded(self.quota));
            }
            if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                root.create_dir_all(parent)
                    .map_err(|e| fs_error(&path, e))?;
            }
            staging
                .rename(&staged, &root, rel)
                .map_err(|e| fs_error(&path, e))?;
            self.stat(&path)
        })();
        if result.is_err() {
            self.unstage(&staged);
        }
        result
    }

    /// Drops an upload that will not be committed.
    pub fn abort(&self, upload: Upload) {
        self.unstage(&upload.staged);
    }

    fn unstage(&self, staged: &str) {
        if let Ok(staging) = self.staging() {
            let _ = staging.remove_file(staged);
        }
    }

    /// Opens the file at `path` for reading, with its length.
    pub fn open_file(&self, path: &str) -> Result<(std::fs::File, u64)> {
        let rel = check(path)?;
        let file = self.root()?.open(rel).map_err(|e| fs_error(path, e))?;
        let meta = file.metadata().map_err(|e| fs_error(path, e))?;
        if meta.is_dir() {
            return Err(Error::BadPath(
                path.into(),
                "is a folder: list it with ?path= instead",
            ));
        }
        Ok((file.into_std(), meta.len()))
    }

    /// The file at `path`, whole (it is within the session's quota).
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let (mut file, len) = self.open_file(path)?;
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        io::Read::read_to_end(&mut file, &mut bytes)
            .map_err(|e| Error::Io("reading a file".into(), e))?;
        Ok(bytes)
    }

    /// The entry at `path`.
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let rel = check(path)?;
        let meta = self
            .root()?
            .symlink_metadata(rel)
            .map_err(|e| fs_error(path, e))?;
        Ok(entry(slashed(rel), &meta))
    }

    /// The entries of the folder at `path` (the workspace itself when empty), by name.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let rel = if path.is_empty() || path == "." {
            Path::new(".")
        } else {
            check(path)?
        };
        let dir = self.root()?.open_dir(rel).map_err(|e| {
            if e.kind() == io::ErrorKind::NotADirectory {
                Error::BadPath(path.into(), "is a file, not a folder")
            } else {
                fs_error(path, e)
            }
        })?;
        let mut all = Vec::new();
        for item in dir.entries().map_err(|e| fs_error(path, e))? {
            let item = item.map_err(|e| fs_error(path, e))?;
            let meta = dir
                .symlink_metadata(item.file_name())
                .map_err(|e| fs_error(path, e))?;
            let name = rel.join(item.file_name());
            all.push(entry(slashed(&name), &meta));
        }
        all.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(all)
    }

    /// Makes the folder at `path` and those above it: whether it was new (`false`: it was
    /// already there).
    pub fn make_dir(&self, path: &str) -> Result<bool> {
        let rel = check(path)?;
        let root = self.root()?;
        match root.symlink_metadata(rel) {
            Ok(meta) if meta.is_dir() => return Ok(false),
            Ok(_) => return Err(Error::BadPath(path.into(), "is a file, not a folder")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_error(path, e)),
        }
        self.check_room()?;
        root.create_dir_all(rel).map_err(|e| fs_error(path, e))?;
        self.recount()?;
        Ok(true)
    }

    /// Moves the entry at `from` to `to` (replacing a file there), and says what it is now.
    pub fn rename(&self, from: &str, to: &str) -> Result<Entry> {
        let (src, dst) = (check(from)?, check(to)?);
        let root = self.root()?;
        root.symlink_metadata(src).map_err(|e| fs_error(from, e))?;
        root.rename(src, &root, dst).map_err(|e| fs_error(to, e))?;
        self.stat(to)
    }

    /// Removes the file, symlink or folder (with everything in it) at `path`.
    pub fn delete(&self, path: &str) -> Result<()> {
        let rel = check(path)?;
        let root = self.root()?;
        let meta = root.symlink_metadata(rel).map_err(|e| fs_error(path, e))?;
        if meta.is_dir() {
            root.remove_dir_all(rel)
        } else {
            root.remove_file(rel)
        }
        .map_err(|e| fs_error(path, e))?;
        self.recount()?;
        Ok(())
    }
}

/// Runs a blocking operation on `workspace` off the async threads.
pub async fn on_workspace<T: Send + 'static>(
    workspace: Arc<Workspace>,
    f: impl FnOnce(&Workspace) -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || f(&workspace))
        .await
        .map_err(|e| Error::Io("a workspace task failed".into(), io::Error::other(e)))?
}

/// Writes `data` to `path` in `workspace`: staged, counted against the quota as it arrives,
/// and moved into place only when complete. Also says whether a file was replaced.
pub async fn upload(
    workspace: Arc<Workspace>,
    path: String,
    data: impl Stream<Item = Result<Bytes>> + Send,
) -> Result<(Entry, bool)> {
    let (upload, file) = on_workspace(workspace.clone(), move |w| w.begin(&path)).await?;
    let replaces = upload.replaces;
    let mut file = tokio::fs::File::from_std(file);
    let copied = async {
        let mut data = std::pin::pin!(data);
        let mut written = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            written += chunk.len() as u64;
            if written > upload.budget {
                return Err(Error::QuotaExceeded(workspace.quota()));
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| Error::Io("writing an upload".into(), e))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::Io("writing an upload".into(), e))
    }
    .await;
    drop(file);
    match copied {
        Ok(()) => {
            let entry = on_workspace(workspace, move |w| w.commit(upload)).await?;
            Ok((entry, replaces))
        }
        Err(e) => {
            on_workspace(workspace, move |w| {
                w.abort(upload);
                Ok(())
            })
            .await?;
            Err(e)
        }
    }
}

fn open_dir(path: &Path) -> Result<Dir> {
    Dir::open_ambient_dir(path, ambient_authority())
        .map_err(|e| Error::Io(format!("opening {}", path.display()), e))
}

/// Checks a client's path: relative, without `..`, NUL or an empty name; `.` parts dropped.
pub fn check(path: &str) -> Result<&Path> {
    let bad = |why| Err(Error::BadPath(path.into(), why));
    if path.is_empty() {
        return bad("is empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("is longer than 4096 bytes");
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    let p = Path::new(path);
    let mut normal = 0;
    for part in p.components() {
        match part {
            Component::Normal(_) => normal += 1,
            Component::CurDir => {}
            Component::ParentDir => return bad("uses `..`, which could leave the workspace"),
            Component::RootDir | Component::Prefix(_) => {
                return bad("is absolute: paths are relative to /workspace");
            }
        }
    }
    if normal == 0 {
        return bad("names the workspace itself, not a file in it");
    }
    Ok(p)
}

fn fs_error(path: &str, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::FileNotFound(path.into()),
        // cap-std refuses a path (through a symlink, say) that resolves outside the folder.
        io::ErrorKind::PermissionDenied => {
            Error::BadPath(path.into(), "leads outside the workspace")
        }
        io::ErrorKind::NotADirectory => Error::BadPath(path.into(), "goes through a file"),
        io::ErrorKind::IsADirectory | io::ErrorKind::DirectoryNotEmpty => {
            Error::BadPath(path.into(), "is a folder")
        }
        _ => Error::Io(format!("workspace path {path:?}"), e),
    }
}

fn slashed(p: &Path) -> String {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn entry(path: String, meta: &cap_std::fs::Metadata) -> Entry {
    let kind = if meta.is_symlink() {
        Kind::Symlink
    } else if meta.is_dir() {
        Kind::Dir
    } else {
        Kind::File
    };
    Entry {
        path,
        kind,
        size: if kind == Kind::Dir { 0 } else { meta.len() },
        modified: meta
            .modified()
            .ok()
            .map(cap_std::time::SystemTime::into_std),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn paths_that_could_escape_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            ".",
            "./",
            "a\0b",
        ] {
            assert!(matches!(check(bad), Err(Error::BadPath(..))), "{bad:?}");
        }
        for good in ["a", "a/b.csv", "./a", "a/./b", "dir/"] {
            assert!(check(good).is_ok(), "{good:?}");
        }
    }

    fn workspace(quota: u64) -> (tempfile::TempDir, Workspace) {
        let tmp = tempfile::tempdir().unwrap();
        let [root, guest_tmp, staging] = ["w", "t", "s"].map(|d| tmp.path().join(d));
        for d in [&root, &guest_tmp, &staging] {
            std::fs::create_dir(d).unwrap();
        }
        let ws = Workspace::open(&root, &guest_tmp, &staging, quota).unwrap();
        (tmp, ws)
    }

    fn put(ws: &Workspace, path: &str, data: &[u8]) -> Result<Entry> {
        use std::io::Write;
        let (up, mut file) = ws.begin(path)?;
        if data.len() as u64 > up.budget {
            ws.abort(up);
            return Err(Error::QuotaExceeded(ws.quota()));
        }
        file.write_all(data).unwrap();
        drop(file);
        ws.commit(up)
    }

    #[test]
    fn uploads_land_whole_list_and_delete() {
        let (_tmp, ws) = workspace(1 << 20);
        let e = put(&ws, "data/in.csv", b"a,b\n1,2\n").unwrap();
        assert_eq!(
            (e.path.as_str(), e.kind, e.size),
            ("data/in.csv", Kind::File, 8)
        );
        let listed = ws.list("").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].path.as_str(), listed[0].kind),
            ("data", Kind::Dir)
        );
        assert_eq!(ws.list("data").unwrap()[0].path, "data/in.csv");
        assert!(matches!(ws.list("data/in.csv"), Err(Error::BadPath(..))));
        assert!(matches!(ws.open_file("data"), Err(Error::BadPath(..))));
        ws.delete("data").unwrap();
        assert!(matches!(
            ws.stat("data/in.csv"),
            Err(Error::FileNotFound(_))
        ));
        assert!(ws.list("").unwrap().is_empty());
    }

    #[test]
    fn the_quota_counts_what_a_replacement_frees() {
        let (_tmp, ws) = workspace(10);
        put(&ws, "a", b"123456").unwrap();
        assert!(matches!(
            put(&ws, "b", b"12345"),
            Err(Error::QuotaExceeded(10))
        ));
        put(&ws, "a", b"1234567890").unwrap();
        assert_eq!(ws.usage().unwrap(), 10);
        assert!(matches!(ws.stat("b"), Err(Error::FileNotFound(_))));
    }

    #[test]
    fn what_the_guest_writes_in_either_folder_is_counted() {
        let (tmp, ws) = workspace(10);
        std::fs::write(tmp.path().join("w/a"), b"123456").unwrap();
        assert_eq!(ws.recount().unwrap(), 6);
        assert!(ws.check_room().is_ok());
        std::fs::create_dir(tmp.path().join("t/d")).unwrap();
        std::fs::write(tmp.path().join("t/d/b"), b"12345").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("t/link")).unwrap();
        assert_eq!(ws.recount().unwrap(), 6 + 5 + "/etc/passwd".len() as u64);
        assert!(matches!(ws.check_room(), Err(Error::DiskFull(10))));
        assert!(matches!(put(&ws, "c", b"1"), Err(Error::QuotaExceeded(10))));
        assert_eq!(ws.clear_tmp().unwrap(), 6);
        assert!(ws.check_room().is_ok());
        assert!(
            std::fs::metadata("/etc/passwd").is_ok(),
            "the link's target stays"
        );
        std::fs::write(tmp.path().join("w/b"), b"12345").unwrap();
        ws.recount().unwrap();
        assert!(ws.check_room().is_err());
        ws.delete("b").unwrap();
        assert!(ws.check_room().is_ok(), "a delete counts again");
    }

    #[test]
    fn symlinks_out_of_the_workspace_lead_nowhere() {
        let (tmp, ws) = workspace(1 << 20);
        std::os::unix::fs::symlink("/etc", tmp.path().join("w/etc")).unwrap();
        std::os::unix::fs::symlink("../s", tmp.path().join("w/up")).unwrap();
        for path in ["etc/passwd", "up/x"] {
            assert!(
                matches!(ws.open_file(path), Err(Error::BadPath(..))),
                "{path}"
            );
        }
        assert!(matches!(put(&ws, "etc/x", b"no"), Err(Error::BadPath(..))));
        assert_eq!(ws.stat("etc").unwrap().kind, Kind::Symlink);
    }
}
