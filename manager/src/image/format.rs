//! An image as bytes: a header (JSON, uncompressed) and a zstd payload of pages, files and
//! history, checked against the manager's bounds as it is read. Snapshot files and exports
//! share it.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::pages::page_size;
use super::{FileRecord, Image, Pages};
use crate::session::types::{Limits, rfc3339};
use crate::{Error, Result};

/// The first bytes of every snapshot file and export.
const MAGIC: &[u8; 8] = b"ARLSNAP1";
/// zstd level: 1 compresses a Python heap about 4x at memory speed.
const ZSTD_LEVEL: i32 = 1;
/// The largest header a snapshot may have (it holds the file list).
const MAX_HEADER: usize = 16 << 20;

/// Reads exactly `len` bytes of the payload's `part`.
fn read_part(z: &mut impl Read, len: u64, part: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(usize::try_from(len.min(64 << 20)).unwrap_or(0));
    z.take(len).read_to_end(&mut bytes).map_err(corrupt)?;
    if bytes.len() as u64 != len {
        return Err(Error::BadSnapshot(format!(
            "its payload ends early: its {part} have {} bytes, its header says {len}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn corrupt(e: std::io::Error) -> Error {
    Error::BadSnapshot(format!("its payload is corrupt: {e}"))
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
            pages: self.pages.count() as u64,
            clock_ns: self.clock_ns,
            executions: self.executions,
            env: self.env.clone(),
            limits: self.limits.into(),
            files: self.files.iter().map(|(r, _)| r.clone()).collect(),
            history: self.history.len() as u64,
            history_bytes: self.history.iter().map(|h| h.len() as u64 + 1).sum(),
            source: self.source.clone(),
            captured_at: rfc3339(self.captured_at),
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
            .numbers()
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
            || header
                .pages
                .checked_mul(header.page_size)
                .is_none_or(|bytes| bytes > header.memory_bytes)
            || files > max_files
            || header.history_bytes > 64 << 20
        {
            return bad("its sizes are over this manager's limits".into());
        }
        let Some(len) = header.payload_len() else {
            return bad("its sizes do not add up".into());
        };
        // Each part is read straight from the stream into its own buffer, grown as the bytes
        // really arrive rather than reserved from what the header claims: a small file that
        // claims gigabytes costs what it holds, and nothing is held twice.
        let mut z = zstd::Decoder::new(input)
            .map_err(|e| Error::BadSnapshot(format!("its payload: {e}")))?;
        let pages = header.pages as usize;
        let index_bytes = read_part(&mut z, pages as u64 * 4, "page index")?;
        let index: Vec<u32> = index_bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect();
        drop(index_bytes);
        let limit = header.memory_bytes / header.page_size;
        if index.windows(2).any(|w| w[0] >= w[1])
            || index.last().is_some_and(|&i| u64::from(i) >= limit)
        {
            return bad("its page index is out of order or out of range".into());
        }
        let data = read_part(&mut z, pages as u64 * header.page_size, "pages")?;
        let mut files = Vec::with_capacity(header.files.len().min(1 << 16));
        for record in &header.files {
            files.push((record.clone(), read_part(&mut z, record.len, "files")?));
        }
        let history = read_part(&mut z, header.history_bytes, "history")?;
        let mut past = [0u8; 1];
        if z.read(&mut past).map_err(corrupt)? != 0 {
            return bad(format!(
                "its payload holds more than the {len} bytes its header says"
            ));
        }
        let history = String::from_utf8(history)
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
            pages: Arc::new(Pages::from_parts(index, data)),
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

pub(crate) fn read_header(input: &mut impl Read) -> Result<Header> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::image::write_dirs;

    fn limits() -> Limits {
        crate::ManagerConfig::new(std::path::PathBuf::new()).defaults
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
    fn a_header_whose_sizes_overflow_is_refused() {
        let page = page_size();
        let image = image(&vec![0u8; page * 4]);
        let mut bytes = vec![];
        image.encode(&mut bytes).unwrap();
        let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[12..12 + len]).unwrap();
        header["pages"] = serde_json::json!(u64::MAX / 2);
        let header = serde_json::to_vec(&header).unwrap();
        let mut crafted = MAGIC.to_vec();
        crafted.extend_from_slice(&(header.len() as u32).to_le_bytes());
        crafted.extend_from_slice(&header);
        crafted.extend_from_slice(&bytes[12 + len..]);
        assert!(matches!(
            Image::decode(&crafted[..], 1 << 40, 1 << 30),
            Err(Error::BadSnapshot(_))
        ));
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

    /// A header with `edit` applied, in front of `bytes`' payload.
    fn with_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[12..12 + len]).unwrap();
        edit(&mut header);
        let header = serde_json::to_vec(&header).unwrap();
        let mut crafted = MAGIC.to_vec();
        crafted.extend_from_slice(&(header.len() as u32).to_le_bytes());
        crafted.extend_from_slice(&header);
        crafted.extend_from_slice(&bytes[12 + len..]);
        crafted
    }

    fn refusal(bytes: &[u8]) -> String {
        match Image::decode(bytes, 1 << 40, 1 << 40) {
            Err(Error::BadSnapshot(why)) => why,
            other => panic!("not refused: {:?}", other.map(|i| i.memory_bytes)),
        }
    }

    #[test]
    fn a_page_index_out_of_order_or_past_the_memory_is_refused() {
        let page = page_size();
        let mut image = image(&vec![0u8; page * 4]);
        let data = vec![7u8; page * 2];
        for index in [vec![3, 4], vec![2, 1], vec![1, 1]] {
            image.pages = Arc::new(Pages::from_parts(index.clone(), data.clone()));
            let mut bytes = vec![];
            image.encode(&mut bytes).unwrap();
            let why = refusal(&bytes);
            assert!(why.contains("page index"), "{index:?}: {why}");
        }
    }

    /// A few kilobytes that claim gigabytes (a zstd bomb, or a header that lies) cost what
    /// they hold: the parts are read as they arrive, never reserved from the claim.
    #[test]
    fn a_payload_shorter_than_its_claim_is_refused_without_reserving_the_claim() {
        let page = page_size() as u64;
        let mut bytes = vec![];
        image(&vec![0u8; page as usize * 4])
            .encode(&mut bytes)
            .unwrap();
        let pages = (1u64 << 40) / page;
        let crafted = with_header(&bytes, |h| {
            h["memory_bytes"] = serde_json::json!(1u64 << 40);
            h["pages"] = serde_json::json!(pages);
        });
        let why = refusal(&crafted);
        assert!(why.contains("ends early"), "{why}");
        let past = with_header(&bytes, |h| {
            h["history_bytes"] = serde_json::json!(65u64 << 20)
        });
        assert!(refusal(&past).contains("limits"));
        let short = with_header(&bytes, |h| {
            h["history_bytes"] = serde_json::json!(h["history_bytes"].as_u64().unwrap() - 1);
        });
        assert!(
            refusal(&short).contains("more than"),
            "a payload longer than its claim"
        );
    }
}
