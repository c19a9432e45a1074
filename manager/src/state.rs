//! A session's state at rest, taken out of its instance and put into another one: what fork,
//! snapshot, export, import and rollback are made of.
//!
//! Between turns a guest's whole state is its linear memory (the C stack pointer, its only
//! mutable global, is back at its initial value whenever an export returns; the funcref table
//! never changes). Almost all of that memory is still the module's copy-on-write image, and
//! Linux tells which host pages are not: those the guest wrote are anonymous in
//! `/proc/self/pagemap`. Capturing a session is copying those pages; putting it back is
//! writing them into a fresh instance of the same module, grown to the same size.
//!
//! Outside the memory live the guest's WASI context (rebuilt with the same preopens in the
//! same order, so that the descriptor numbers saved in memory stay true), its monotonic clock
//! ([`GuestClock`], carried over so that it never runs backwards) and its files (copied).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::session::Limits;
use crate::{Error, Result};

/// The first bytes of every snapshot file and export.
const MAGIC: &[u8; 8] = b"ARLSNAP1";
/// zstd level: 1 compresses a Python heap about 4x at memory speed.
const ZSTD_LEVEL: i32 = 1;
/// The largest header a snapshot may have (it holds the file list).
const MAX_HEADER: usize = 16 << 20;

/// The host's page size, the unit of capture.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// `/proc/self/pagemap`, opened once; `None` where the kernel does not offer it (gVisor,
/// some hardened kernels), and then every page counts as written.
fn pagemap() -> Option<&'static File> {
    static PAGEMAP: OnceLock<Option<File>> = OnceLock::new();
    PAGEMAP
        .get_or_init(|| match File::open("/proc/self/pagemap") {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(error = %e, "no /proc/self/pagemap: captures copy whole memories");
                None
            }
        })
        .as_ref()
}

/// The host pages of `memory` that the guest wrote since it was instantiated, ascending.
/// A page not listed still holds the module's image (or zeros past it).
pub fn written_pages(memory: &[u8]) -> Vec<u32> {
    let page = page_size();
    let count = memory.len() / page;
    let all = || (0..count as u32).collect();
    let Some(pagemap) = pagemap() else {
        return all();
    };
    let start = memory.as_ptr() as usize;
    let mut entries = vec![0u8; count * 8];
    if let Err(e) = pagemap.read_exact_at(&mut entries, (start / page) as u64 * 8) {
        tracing::warn!(error = %e, "reading /proc/self/pagemap failed: copying the whole memory");
        return all();
    }
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    entries
        .chunks_exact(8)
        .enumerate()
        .filter_map(|(i, e)| {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            let private = e & (PRESENT | SWAPPED) != 0 && e & FILE_OR_SHARED == 0;
            private.then_some(i as u32)
        })
        .collect()
}

/// Copies of some host pages of a linear memory: their numbers (ascending) and, for each,
/// where its bytes are in `data` (pages added later go at its end, so that keeping a
/// checkpoint up to date never moves or re-faults what it holds already).
#[derive(Debug, Default)]
pub struct Pages {
    index: Vec<u32>,
    slots: Vec<u32>,
    data: Vec<u8>,
}

impl Clone for Pages {
    fn clone(&self) -> Self {
        let mut data = bytes_with_room(self.data.len());
        data.extend_from_slice(&self.data);
        Self {
            index: self.index.clone(),
            slots: self.slots.clone(),
            data,
        }
    }
}

impl PartialEq for Pages {
    /// The same pages with the same bytes, wherever they sit in `data`.
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

impl Eq for Pages {}

impl Pages {
    /// The pages of `memory` the guest wrote.
    pub fn capture(memory: &[u8]) -> Self {
        let index = written_pages(memory);
        let mut data = bytes_with_room(index.len() * page_size());
        for &i in &index {
            data.extend_from_slice(page_of(memory, i));
        }
        let slots = (0..index.len() as u32).collect();
        Self { index, slots, data }
    }

    /// Each page's number and bytes, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u8])> {
        (0..self.index.len()).map(|n| (self.index[n], self.slot(n)))
    }

    /// Writes the pages into `memory`, which holds the module's image elsewhere.
    pub fn restore(&self, memory: &mut [u8]) {
        let page = page_size();
        for (i, bytes) in self.iter() {
            let at = i as usize * page;
            memory[at..at + page].copy_from_slice(bytes);
        }
    }

    /// Brings the copies in `pages` up to date with `memory`, which has only grown and been
    /// written since: pages that changed are copied again, pages written for the first time
    /// added. Copies shared with a capture still in use are left to it (copy on write).
    pub fn sync(pages: &mut Arc<Pages>, memory: &[u8]) {
        let written = written_pages(memory);
        let changed: Vec<usize> = (0..pages.index.len())
            .filter(|&n| pages.slot(n) != page_of(memory, pages.index[n]))
            .collect();
        let added: Vec<u32> = {
            let mut known = pages.index.iter().peekable();
            written
                .into_iter()
                .filter(|i| {
                    while known.next_if(|k| *k < i).is_some() {}
                    known.peek() != Some(&i)
                })
                .collect()
        };
        if changed.is_empty() && added.is_empty() {
            return;
        }
        let pages = Arc::make_mut(pages);
        let page = page_size();
        for n in changed {
            let at = pages.slots[n] as usize * page;
            pages.data[at..at + page].copy_from_slice(page_of(memory, pages.index[n]));
        }
        if added.is_empty() {
            return;
        }
        let first_slot = pages.index.len() as u32;
        let needed = pages.data.len() + added.len() * page;
        if pages.data.capacity() < needed.max(OWN_MAPPING) {
            let mut grown = bytes_with_room(needed);
            grown.extend_from_slice(&pages.data);
            pages.data = grown;
        }
        for &i in &added {
            pages.data.extend_from_slice(page_of(memory, i));
        }
        // Merge the new pages into the ascending index.
        let old = std::mem::take(&mut pages.index)
            .into_iter()
            .zip(std::mem::take(&mut pages.slots));
        let mut merged: Vec<(u32, u32)> = old.chain(added.into_iter().zip(first_slot..)).collect();
        merged.sort_unstable_by_key(|&(i, _)| i);
        (pages.index, pages.slots) = merged.into_iter().unzip();
    }

    fn slot(&self, n: usize) -> &[u8] {
        let page = page_size();
        let at = self.slots[n] as usize * page;
        &self.data[at..at + page]
    }
}

/// The least a copy of pages reserves (address space, not memory): above the largest size
/// glibc's malloc serves from its heaps (32 MiB), so that each copy is a mapping of its own,
/// given back to the kernel whole when it is dropped. Served from a heap, the copies an idle
/// session lets go of would stay resident in it.
const OWN_MAPPING: usize = 33 << 20;

/// An empty buffer for at least `len` bytes, in a mapping of its own (see [`OWN_MAPPING`]).
fn bytes_with_room(len: usize) -> Vec<u8> {
    Vec::with_capacity(len.max(OWN_MAPPING))
}

fn page_of(memory: &[u8], i: u32) -> &[u8] {
    let page = page_size();
    let at = i as usize * page;
    &memory[at..at + page]
}

/// The guest's monotonic clock: nanoseconds since its session first started, carried across
/// forks, restores and rollbacks so that it never runs backwards.
#[derive(Debug, Clone, Copy)]
pub struct GuestClock {
    origin: Instant,
    offset_ns: u64,
}

impl GuestClock {
    /// A clock that starts at zero now.
    pub fn new() -> Self {
        Self::continuing(0)
    }

    /// A clock that reads `ns` now and runs on from there.
    pub fn continuing(ns: u64) -> Self {
        Self {
            origin: Instant::now(),
            offset_ns: ns,
        }
    }
}

impl Default for GuestClock {
    fn default() -> Self {
        Self::new()
    }
}

impl wasmtime_wasi::HostMonotonicClock for GuestClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.offset_ns.saturating_add(elapsed)
    }
}

/// A file or folder of a session's own tree (`workspace/...` or `tmp/...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Relative to the session's folder, `/`-separated.
    pub path: String,
    /// Bytes that follow in the payload; 0 for a folder.
    pub len: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dir: bool,
}

/// A session at rest, out of its instance: everything needed to make another one like it.
#[derive(Debug, Clone)]
pub struct Image {
    pub runtime: String,
    /// The sha256 of the module it ran; it fits no other.
    pub module: String,
    pub memory_bytes: u64,
    /// Shared with the session's rollback checkpoint, when it keeps one: a capture copies
    /// nothing.
    pub pages: Arc<Pages>,
    /// The guest's monotonic clock when it was captured.
    pub clock_ns: u64,
    /// Turns run so far (the next cell's number follows on).
    pub executions: u64,
    /// The WASI environment the session was created with.
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    /// Its trajectory so far, as JSON Lines entries.
    pub history: Vec<Arc<str>>,
    /// Its files, when the image travels as bytes; a fork copies folders instead.
    pub files: Vec<(FileRecord, Vec<u8>)>,
    pub source: String,
    pub captured_at: SystemTime,
}

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

/// What a snapshot says about itself, uncompressed at the front of its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub runtime: String,
    pub module: String,
    pub memory_bytes: u64,
    pub page_size: u64,
    /// Pages in the payload.
    pub pages: u64,
    pub clock_ns: u64,
    pub executions: u64,
    pub env: Vec<(String, String)>,
    pub limits: LimitsRecord,
    pub files: Vec<FileRecord>,
    /// History entries and their bytes (joined by newlines) at the payload's end.
    pub history: u64,
    pub history_bytes: u64,
    /// The session it was taken from.
    pub source: String,
    /// RFC 3339.
    pub captured_at: String,
}

impl Header {
    /// Bytes the payload holds once decompressed.
    fn payload_len(&self) -> Option<u64> {
        let files: u64 = self.files.iter().map(|f| f.len).sum();
        self.pages
            .checked_mul(4 + self.page_size)?
            .checked_add(files)?
            .checked_add(self.history_bytes)
    }
}

/// [`Limits`] as a snapshot keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsRecord {
    pub timeout_ms: u64,
    pub memory_bytes: u64,
    pub output_bytes: u64,
    pub idle_ttl_s: u64,
    pub lifetime_s: u64,
    pub workspace_bytes: u64,
    #[serde(default = "yes")]
    pub rollback: bool,
}

fn yes() -> bool {
    true
}

impl From<Limits> for LimitsRecord {
    fn from(l: Limits) -> Self {
        Self {
            timeout_ms: l.timeout.as_millis() as u64,
            memory_bytes: l.memory_bytes,
            output_bytes: l.output_bytes as u64,
            idle_ttl_s: l.idle_ttl.as_secs(),
            lifetime_s: l.lifetime.as_secs(),
            workspace_bytes: l.workspace_bytes,
            rollback: l.rollback,
        }
    }
}

impl From<LimitsRecord> for Limits {
    fn from(l: LimitsRecord) -> Self {
        Self {
            timeout: Duration::from_millis(l.timeout_ms),
            memory_bytes: l.memory_bytes,
            output_bytes: usize::try_from(l.output_bytes).unwrap_or(usize::MAX),
            idle_ttl: Duration::from_secs(l.idle_ttl_s),
            lifetime: Duration::from_secs(l.lifetime_s),
            workspace_bytes: l.workspace_bytes,
            rollback: l.rollback,
        }
    }
}

impl Image {
    fn header(&self) -> Header {
        Header {
            runtime: self.runtime.clone(),
            module: self.module.clone(),
            memory_bytes: self.memory_bytes,
            page_size: page_size() as u64,
            pages: self.pages.index.len() as u64,
            clock_ns: self.clock_ns,
            executions: self.executions,
            env: self.env.clone(),
            limits: self.limits.into(),
            files: self.files.iter().map(|(r, _)| r.clone()).collect(),
            history: self.history.len() as u64,
            history_bytes: self.history.iter().map(|h| h.len() as u64 + 1).sum(),
            source: self.source.clone(),
            captured_at: crate::rfc3339(self.captured_at),
        }
    }

    /// The image as bytes: magic, header length, JSON header, then one zstd frame (with a
    /// checksum) of the page index, the pages, the files and the history.
    pub fn encode(&self, out: impl Write) -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(out);
        let header = serde_json::to_vec(&self.header()).map_err(std::io::Error::other)?;
        out.write_all(MAGIC)?;
        out.write_all(&(header.len() as u32).to_le_bytes())?;
        out.write_all(&header)?;
        let mut z = zstd::Encoder::new(out, ZSTD_LEVEL)?;
        z.include_checksum(true)?;
        let index: Vec<u8> = self
            .pages
            .index
            .iter()
            .flat_map(|i| i.to_le_bytes())
            .collect();
        z.write_all(&index)?;
        for (_, bytes) in self.pages.iter() {
            z.write_all(bytes)?;
        }
        for (_, data) in &self.files {
            z.write_all(data)?;
        }
        for line in &self.history {
            z.write_all(line.as_bytes())?;
            z.write_all(b"\n")?;
        }
        z.finish()?.flush()
    }

    /// Reads an image written by [`encode`](Self::encode). `max_memory` bounds what the
    /// header may claim, so that a hostile file cannot make the manager allocate without end.
    pub fn decode(mut input: impl Read, max_memory: u64, max_files: u64) -> Result<Self> {
        let header = read_header(&mut input)?;
        let bad = |m: String| Err(Error::BadSnapshot(m));
        if header.page_size != page_size() as u64 {
            return bad(format!(
                "it was taken on a host with {} B pages, this one has {} B",
                header.page_size,
                page_size()
            ));
        }
        let files: u64 = header.files.iter().map(|f| f.len).sum();
        if header.memory_bytes > max_memory
            || header.pages * header.page_size > header.memory_bytes
            || files > max_files
            || header.history_bytes > 64 << 20
        {
            return bad("its sizes are over this manager's limits".into());
        }
        let Some(len) = header.payload_len() else {
            return bad("its sizes do not add up".into());
        };
        let mut payload = Vec::with_capacity(len as usize);
        let mut z = zstd::Decoder::new(input)
            .map_err(|e| Error::BadSnapshot(format!("its payload: {e}")))?
            .take(len + 1);
        z.read_to_end(&mut payload)
            .map_err(|e| Error::BadSnapshot(format!("its payload is corrupt: {e}")))?;
        if payload.len() as u64 != len {
            return bad(format!(
                "its payload has {} bytes, its header says {len}",
                payload.len()
            ));
        }
        let pages = header.pages as usize;
        let (index, rest) = payload.split_at(pages * 4);
        let index: Vec<u32> = index
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect();
        let limit = header.memory_bytes / header.page_size;
        if index.windows(2).any(|w| w[0] >= w[1])
            || index.last().is_some_and(|&i| u64::from(i) >= limit)
        {
            return bad("its page index is out of order or out of range".into());
        }
        let (data, mut rest) = rest.split_at(pages * header.page_size as usize);
        let mut files = Vec::with_capacity(header.files.len());
        for record in &header.files {
            let (bytes, tail) = rest.split_at(record.len as usize);
            files.push((record.clone(), bytes.to_vec()));
            rest = tail;
        }
        let history = std::str::from_utf8(rest)
            .map_err(|_| Error::BadSnapshot("its history is not UTF-8".into()))?
            .lines()
            .map(Arc::from)
            .collect();
        let captured_at =
            humantime::parse_rfc3339(&header.captured_at).unwrap_or(SystemTime::now());
        Ok(Self {
            runtime: header.runtime,
            module: header.module,
            memory_bytes: header.memory_bytes,
            pages: Arc::new(Pages {
                slots: (0..index.len() as u32).collect(),
                index,
                data: data.to_vec(),
            }),
            clock_ns: header.clock_ns,
            executions: header.executions,
            env: header.env,
            limits: header.limits.into(),
            history,
            files,
            source: header.source,
            captured_at,
        })
    }
}

fn read_header(input: &mut impl Read) -> Result<Header> {
    let bad = |m: &str| Error::BadSnapshot(m.to_owned());
    let mut front = [0u8; 12];
    input
        .read_exact(&mut front)
        .map_err(|_| bad("it is too short to be a snapshot"))?;
    if &front[..8] != MAGIC {
        return Err(bad("it is not an ARL snapshot (wrong magic bytes)"));
    }
    let len = u32::from_le_bytes([front[8], front[9], front[10], front[11]]) as usize;
    if len > MAX_HEADER {
        return Err(bad("its header is too large"));
    }
    let mut header = vec![0u8; len];
    input
        .read_exact(&mut header)
        .map_err(|_| bad("its header is cut short"))?;
    serde_json::from_slice(&header).map_err(|e| Error::BadSnapshot(format!("its header: {e}")))
}

/// Snapshots on disk, one file each, shared by every manager that is given the same folder.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

/// What a stored snapshot is, as `GET /v1/snapshots/{id}` shows it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub id: String,
    pub header: Header,
    /// Its file's size, compressed.
    pub size_bytes: u64,
}

impl SnapshotStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, id: &str) -> Result<PathBuf> {
        let valid = id
            .strip_prefix("snap-")
            .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(Error::SnapshotNotFound(id.to_owned()));
        }
        Ok(self.dir.join(format!("{id}.snap")))
    }

    /// Writes `image` as a new snapshot; its id.
    pub fn save(&self, image: &Image) -> Result<SnapshotInfo> {
        let id = format!("snap-{}", uuid::Uuid::new_v4().simple());
        let path = self.path(&id)?;
        let io = |what: &str, p: &Path| {
            let what = format!("{what} {}", p.display());
            move |e| Error::Io(what, e)
        };
        std::fs::create_dir_all(&self.dir).map_err(io("creating", &self.dir))?;
        let partial = path.with_extension("partial");
        let file = File::create(&partial).map_err(io("creating", &partial))?;
        image
            .encode(&file)
            .and_then(|()| file.sync_data())
            .map_err(io("writing", &partial))?;
        std::fs::rename(&partial, &path).map_err(io("moving into", &path))?;
        self.info(&id)
    }

    /// The snapshot's header and size, read without decompressing it.
    pub fn info(&self, id: &str) -> Result<SnapshotInfo> {
        let path = self.path(id)?;
        let mut file = self.open(id, &path)?;
        let size_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        let header = read_header(&mut std::io::BufReader::new(&mut file))?;
        Ok(SnapshotInfo {
            id: id.to_owned(),
            header,
            size_bytes,
        })
    }

    /// The snapshot's image.
    pub fn load(&self, id: &str, max_memory: u64, max_files: u64) -> Result<Image> {
        let path = self.path(id)?;
        let file = self.open(id, &path)?;
        Image::decode(std::io::BufReader::new(file), max_memory, max_files)
    }

    pub fn delete(&self, id: &str) -> Result<()> {
        let path = self.path(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::SnapshotNotFound(id.to_owned()))
            }
            Err(e) => Err(Error::Io(format!("removing {}", path.display()), e)),
        }
    }

    /// Every stored snapshot, newest first; files that are not snapshots are skipped.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut all: Vec<SnapshotInfo> = entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".snap")
                    .map(str::to_owned)
            })
            .filter_map(|id| self.info(&id).ok())
            .collect();
        all.sort_by(|a, b| b.header.captured_at.cmp(&a.header.captured_at));
        all
    }

    fn open(&self, id: &str, path: &Path) -> Result<File> {
        File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::SnapshotNotFound(id.to_owned()),
            _ => Error::Io(format!("opening {}", path.display()), e),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn limits() -> Limits {
        crate::ManagerConfig::new(PathBuf::new()).defaults
    }

    fn image(memory: &[u8]) -> Image {
        Image {
            runtime: "python".into(),
            module: "abc".into(),
            memory_bytes: memory.len() as u64,
            pages: Arc::new(Pages::capture(memory)),
            clock_ns: 42,
            executions: 3,
            env: vec![("A".into(), "1".into())],
            limits: limits(),
            history: vec![Arc::from("{\"n\":1}")],
            files: vec![
                (
                    FileRecord {
                        path: "workspace/d".into(),
                        len: 0,
                        dir: true,
                    },
                    vec![],
                ),
                (
                    FileRecord {
                        path: "workspace/d/f".into(),
                        len: 2,
                        dir: false,
                    },
                    b"hi".to_vec(),
                ),
            ],
            source: "s1".into(),
            captured_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
        }
    }

    #[test]
    fn written_pages_are_the_ones_touched() {
        let page = page_size();
        let mut memory = vec![0u8; page * 64];
        memory[page * 3] = 7;
        memory[page * 40 + 5] = 9;
        let pages = Pages::capture(&memory);
        let mut fresh = vec![0u8; page * 64];
        pages.restore(&mut fresh);
        assert_eq!(fresh, memory);
    }

    #[test]
    fn a_sync_takes_the_pages_written_since() {
        let page = page_size();
        let mut memory = vec![1u8; page * 8];
        let mut pages = Arc::new(Pages::capture(&memory));
        memory[page * 2] = 5;
        let shared = pages.clone();
        Pages::sync(&mut pages, &memory);
        assert!(
            !Arc::ptr_eq(&pages, &shared),
            "a shared copy is left as it was"
        );
        let mut copy = vec![1u8; page * 8];
        pages.restore(&mut copy);
        assert_eq!(copy, memory);
        let mut old = vec![1u8; page * 8];
        shared.restore(&mut old);
        assert_eq!(old[page * 2], 1);
    }

    #[test]
    fn pages_written_later_are_merged_in_order() {
        let page = page_size();
        let mut pages = Arc::new(Pages {
            index: vec![1, 5],
            slots: vec![0, 1],
            data: vec![7u8; page * 2],
        });
        let mut memory = vec![0u8; page * 8];
        memory[page..page * 2].fill(7);
        memory[page * 5..page * 6].fill(7);
        memory[page * 3] = 9; // written for the first time
        Pages::sync(&mut pages, &memory);
        let mut back = vec![0u8; page * 8];
        pages.restore(&mut back);
        assert_eq!(back, memory);
        assert!(
            pages.index.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            pages.index
        );
    }

    #[test]
    fn an_image_survives_its_bytes() {
        let page = page_size();
        let mut memory = vec![0u8; page * 16];
        memory[page * 5..page * 6].fill(3);
        let image = image(&memory);
        let mut bytes = vec![];
        image.encode(&mut bytes).unwrap();
        let back = Image::decode(&bytes[..], 1 << 30, 1 << 30).unwrap();
        assert_eq!(back.pages, image.pages);
        assert_eq!(back.files, image.files);
        assert_eq!(back.history, image.history);
        assert_eq!(
            (back.clock_ns, back.executions, back.limits),
            (42, 3, image.limits)
        );
        assert_eq!(back.captured_at, image.captured_at);
    }

    #[test]
    fn damaged_or_hostile_bytes_are_refused() {
        let page = page_size();
        let image = image(&vec![0u8; page * 4]);
        let mut bytes = vec![];
        image.encode(&mut bytes).unwrap();
        let refused = |b: &[u8], max: u64| {
            matches!(Image::decode(b, max, 1 << 30), Err(Error::BadSnapshot(_)))
        };
        assert!(refused(b"not a snapshot", 1 << 30));
        assert!(refused(&bytes[..bytes.len() - 3], 1 << 30), "cut short");
        let mut flipped = bytes.clone();
        let last = flipped.len() - 6;
        flipped[last] ^= 0xff;
        assert!(
            refused(&flipped, 1 << 30),
            "a flipped byte fails the checksum"
        );
        assert!(refused(&bytes, 1), "over the memory limit");
        let mut escaping = image.clone();
        escaping.files = vec![(
            FileRecord {
                path: "workspace/../../etc".into(),
                len: 0,
                dir: true,
            },
            vec![],
        )];
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            write_dirs(dir.path(), &escaping.files),
            Err(Error::BadSnapshot(_))
        ));
    }

    #[test]
    fn the_guest_clock_runs_on_from_where_it_was() {
        use wasmtime_wasi::HostMonotonicClock;
        let clock = GuestClock::continuing(5_000_000_000);
        assert!(clock.now() >= 5_000_000_000);
        assert!(GuestClock::new().now() < 5_000_000_000);
    }

    #[test]
    fn snapshot_ids_cannot_name_other_files() {
        let store = SnapshotStore::new(PathBuf::from("/tmp/none"));
        for id in ["../x", "snap-../../etc/passwd", "snap-zz", ""] {
            assert!(
                matches!(store.info(id), Err(Error::SnapshotNotFound(_))),
                "{id}"
            );
        }
    }
}
