//! The snapshot store: images kept as objects in a local folder or an S3-compatible bucket,
//! shared by every manager given the same location.
//!
//! | key | what it is |
//! |---|---|
//! | `snap-<hex>.snap` | a snapshot a client took, under the id it was given |
//! | `sessions/<id>.snap` | a suspended or checkpointed session's image |
//! | `sessions/<id>.json` | its [`SessionRecord`]: the index a restarted manager reads |
//!
//! Every object is written whole or not at all (a local file is staged and renamed, an S3
//! object appears when its upload completes), and an image carries its own checksum, so a
//! write cut short by a crash is refused when read, never restored wrong.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::TryStreamExt as _;
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};

use crate::image::format::read_header;
use crate::image::{Header, Image};
use crate::{Error, Result};

/// Bytes fetched to read a snapshot's header without its payload; a longer header (one
/// listing many files) costs a second read.
const HEADER_PEEK: u64 = 64 << 10;

/// Snapshots and sessions at rest, one object each.
#[derive(Clone)]
pub struct SnapshotStore {
    objects: Arc<dyn ObjectStore>,
    /// Where it is, as logs and errors name it.
    location: String,
    /// The folder, when the store is one (a crashed manager's staged files are swept from it).
    folder: Option<PathBuf>,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.location)
    }
}

/// What a stored snapshot is, as `GET /v1/snapshots/{id}` shows it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub id: String,
    pub header: Header,
    /// Its object's size, compressed.
    pub size_bytes: u64,
}

/// How a session is kept in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kept {
    /// Suspended: its instance was freed, and the image is all there is of it.
    Suspended,
    /// Live on its owner, which checkpointed it: after a crash it comes back as of then.
    Checkpoint,
    /// Live on its owner and never checkpointed: after a crash it is known, and lost.
    Held,
}

/// A session the store keeps, as its index records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub runtime: String,
    pub kept: Kept,
    /// The `--id-prefix` of the manager that holds it; `None` once it is released for any
    /// manager sharing the store to resume (a drain moves it so).
    pub owner: Option<String>,
    /// Turns its image holds.
    pub executions: u64,
    pub created_at_ms: u64,
    pub last_used_at_ms: u64,
    pub saved_at_ms: u64,
    /// Its lifetime left when it was saved: a suspended session's clock does not run.
    pub lifetime_left_ms: u64,
    /// Unused this long, it is suspended; zero: never.
    pub suspend_after_ms: u64,
    pub limits: crate::image::LimitsRecord,
    /// Its image's size, compressed.
    pub image_bytes: u64,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_epoch_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn failed(what: String) -> impl FnOnce(object_store::Error) -> Error {
    move |e| Error::Io(what, std::io::Error::other(e))
}

fn is_missing(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl SnapshotStore {
    /// The store at `location`: `s3://bucket[/prefix]` (credentials, region and endpoint from
    /// the `AWS_*` environment, as the AWS tools read them), or a local folder, made if absent.
    pub fn open(location: &str) -> Result<Self> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::InvalidRequest(format!(
                    "the store {location:?} names no bucket"
                )));
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| Error::InvalidRequest(format!("the store {location:?}: {e}")))?;
            let objects: Arc<dyn ObjectStore> = match prefix.trim_matches('/') {
                "" => Arc::new(s3),
                prefix => Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)),
            };
            return Ok(Self {
                objects,
                location: location.to_owned(),
                folder: None,
            });
        }
        let dir = PathBuf::from(location);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
        let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(failed(format!("opening {}", dir.display())))?
            .with_automatic_cleanup(true);
        Ok(Self {
            objects: Arc::new(local),
            location: dir.display().to_string(),
            folder: Some(dir),
        })
    }

    /// Where the store is.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn snapshot_key(id: &str) -> Result<Key> {
        let valid = id
            .strip_prefix("snap-")
            .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(Error::SnapshotNotFound(id.to_owned()));
        }
        Ok(Key::from(format!("{id}.snap")))
    }

    fn session_key(id: &str, ext: &str) -> Key {
        Key::from(format!("sessions/{id}.{ext}"))
    }

    async fn put_image(&self, key: &Key, image: Image) -> Result<u64> {
        let bytes = tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            image.encode(&mut bytes).map(|()| bytes)
        })
        .await
        .map_err(|e| Error::Io("encoding an image".into(), std::io::Error::other(e)))?
        .map_err(|e| Error::Io("encoding an image".into(), e))?;
        let len = bytes.len() as u64;
        self.objects
            .put(key, PutPayload::from(bytes))
            .await
            .map_err(failed(format!("writing {key} to the store")))?;
        Ok(len)
    }

    async fn get_image(&self, key: &Key, bounds: (u64, u64)) -> Result<Option<Image>> {
        let bytes = match self.objects.get(key).await {
            Ok(got) => got.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(failed(format!("reading {key} from the store"))(e)),
        };
        let (max_memory, max_files) = bounds;
        tokio::task::spawn_blocking(move || Image::decode(&bytes[..], max_memory, max_files))
            .await
            .map_err(|e| Error::Io("decoding an image".into(), std::io::Error::other(e)))?
            .map(Some)
    }

    /// Writes `image` as a new snapshot; its id.
    pub async fn save(&self, image: Image) -> Result<SnapshotInfo> {
        let id = format!("snap-{}", uuid::Uuid::new_v4().simple());
        self.put_image(&Self::snapshot_key(&id)?, image).await?;
        self.info(&id).await
    }

    /// The snapshot's header and size, read without its payload.
    pub async fn info(&self, id: &str) -> Result<SnapshotInfo> {
        let key = Self::snapshot_key(id)?;
        let missing = |e: object_store::Error| {
            if is_missing(&e) {
                Error::SnapshotNotFound(id.to_owned())
            } else {
                failed(format!("reading {key} from the store"))(e)
            }
        };
        let meta = self.objects.head(&key).await.map_err(missing)?;
        let front = self
            .objects
            .get_range(&key, 0..meta.size.min(HEADER_PEEK))
            .await
            .map_err(missing)?;
        let header = match read_header(&mut &front[..]) {
            Err(Error::BadSnapshot(_)) if meta.size > HEADER_PEEK => {
                let whole = self.objects.get(&key).await.map_err(missing)?;
                let bytes = whole.bytes().await.map_err(missing)?;
                read_header(&mut &bytes[..])?
            }
            read => read?,
        };
        Ok(SnapshotInfo {
            id: id.to_owned(),
            header,
            size_bytes: meta.size,
        })
    }

    /// The snapshot's image, within the manager's `(memory, files)` bounds.
    pub async fn load(&self, id: &str, bounds: (u64, u64)) -> Result<Image> {
        self.get_image(&Self::snapshot_key(id)?, bounds)
            .await?
            .ok_or_else(|| Error::SnapshotNotFound(id.to_owned()))
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        let key = Self::snapshot_key(id)?;
        // A local folder deletes what is not there without a word: ask first.
        match self.objects.head(&key).await {
            Err(e) if is_missing(&e) => return Err(Error::SnapshotNotFound(id.to_owned())),
            _ => {}
        }
        self.objects
            .delete(&key)
            .await
            .map_err(failed(format!("removing {key} from the store")))
    }

    /// Every stored snapshot, newest first; objects that are not snapshots are skipped.
    pub async fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let ids: Vec<String> = self
            .objects
            .list_with_delimiter(None)
            .await
            .map_err(failed("listing the store".into()))?
            .objects
            .into_iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?;
                name.strip_suffix(".snap").map(str::to_owned)
            })
            .collect();
        let mut all = Vec::with_capacity(ids.len());
        for id in ids {
            if let Ok(info) = self.info(&id).await {
                all.push(info);
            }
        }
        all.sort_by(|a, b| b.header.captured_at.cmp(&a.header.captured_at));
        Ok(all)
    }

    /// Keeps session `record.id` with `image` (none for [`Kept::Held`]): the image first,
    /// then the record, so that a record never names an image that was not written.
    pub async fn put_session(
        &self,
        mut record: SessionRecord,
        image: Option<Image>,
    ) -> Result<u64> {
        if let Some(image) = image {
            let key = Self::session_key(&record.id, "snap");
            record.image_bytes = self.put_image(&key, image).await?;
        }
        self.put_record(&record).await?;
        Ok(record.image_bytes)
    }

    /// Rewrites session `record.id`'s record alone (its owner or state changed).
    pub async fn put_record(&self, record: &SessionRecord) -> Result<()> {
        let key = Self::session_key(&record.id, "json");
        let json = serde_json::to_vec(record)
            .map_err(|e| Error::Io("encoding a session record".into(), std::io::Error::other(e)))?;
        self.objects
            .put(&key, PutPayload::from(json))
            .await
            .map_err(failed(format!("writing {key} to the store")))?;
        Ok(())
    }

    /// Session `id`'s record, if the store keeps it.
    pub async fn session(&self, id: &str) -> Result<Option<SessionRecord>> {
        let key = Self::session_key(id, "json");
        let bytes = match self.objects.get(&key).await {
            Ok(got) => got.bytes().await,
            Err(e) => Err(e),
        };
        match bytes {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::BadSnapshot(format!("the record of session {id:?} is damaged: {e}"))
            }),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(failed(format!("reading {key} from the store"))(e)),
        }
    }

    /// Session `id`'s image; `None` when the store has none.
    pub async fn session_image(&self, id: &str, bounds: (u64, u64)) -> Result<Option<Image>> {
        self.get_image(&Self::session_key(id, "snap"), bounds).await
    }

    /// Every session record in the store; damaged records are logged and skipped.
    pub async fn sessions(&self) -> Result<Vec<SessionRecord>> {
        let keys: Vec<Key> = self
            .objects
            .list(Some(&Key::from("sessions")))
            .try_filter(|meta| std::future::ready(meta.location.as_ref().ends_with(".json")))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(failed("listing the store's sessions".into()))?;
        let mut all = Vec::with_capacity(keys.len());
        for key in keys {
            let id = key
                .filename()
                .and_then(|n| n.strip_suffix(".json"))
                .unwrap_or_default()
                .to_owned();
            match self.session(&id).await {
                Ok(Some(record)) => all.push(record),
                Ok(None) => {}
                Err(e) => tracing::warn!(session = id, error = %e, "skipping a session record"),
            }
        }
        Ok(all)
    }

    /// Forgets session `id`: its record first, then its image.
    pub async fn delete_session(&self, id: &str) -> Result<()> {
        for ext in ["json", "snap"] {
            let key = Self::session_key(id, ext);
            match self.objects.delete(&key).await {
                Err(e) if !is_missing(&e) => {
                    return Err(failed(format!("removing {key} from the store"))(e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes what a writer that died mid-write left in a local store (staged `#` files,
    /// and the `.partial` files of earlier versions); how many.
    pub fn sweep(&self) -> usize {
        let Some(dir) = &self.folder else { return 0 };
        let mut swept = 0;
        let mut folders = vec![dir.clone()];
        while let Some(folder) = folders.pop() {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    folders.push(path);
                } else if (name.contains('#') || name.ends_with(".partial"))
                    && std::fs::remove_file(&path).is_ok()
                {
                    swept += 1;
                }
            }
        }
        swept
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[tokio::test]
    async fn snapshot_ids_cannot_name_other_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(&dir.path().display().to_string()).unwrap();
        for id in ["../x", "snap-../../etc/passwd", "snap-zz", ""] {
            assert!(
                matches!(store.info(id).await, Err(Error::SnapshotNotFound(_))),
                "{id}"
            );
        }
    }

    #[test]
    fn a_bucket_must_be_named() {
        assert!(matches!(
            SnapshotStore::open("s3://"),
            Err(Error::InvalidRequest(_))
        ));
    }
}
