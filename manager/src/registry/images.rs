//! A session's image taken out and put back: fork, snapshot, export, import and restore, each
//! a new session started from an [`Image`] on a slot of its own.

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::request::CreateRequest;
use super::{Registry, blocking};
use crate::image::{self, Image};
use crate::session::{Origin, Session};
use crate::snapshots::{SnapshotInfo, SnapshotStore};
use crate::{Error, Result};

/// Where an image comes from, which decides how far it is trusted.
pub(super) enum Provenance {
    /// Captured just now from a live session of this manager (whose folder is given): its
    /// limits are the ones its create was checked for.
    Fork(PathBuf),
    /// A stored snapshot or an import: its limits are a claim, checked as a create's.
    Elsewhere,
}

impl Registry {
    /// A turn to decode an image: at most [`DECODING`](super::DECODING) at once, since each
    /// may hold up to the manager's image bounds in memory while it is read.
    pub(super) async fn decoding_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.inner
            .decoding
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// The largest import (an export's bytes) this manager takes.
    pub fn import_limit(&self) -> usize {
        let (memory, files) = self.image_bounds();
        usize::try_from(memory.saturating_add(files)).unwrap_or(usize::MAX)
    }

    /// The most memory and file bytes an image may claim here.
    pub(super) fn image_bounds(&self) -> (u64, u64) {
        let config = &self.inner.config;
        (
            config.max_memory_bytes,
            config.defaults.workspace_bytes.max(1 << 30),
        )
    }

    /// A new session with the same interpreter state and files as `id`'s, evolving on its
    /// own from now: its pseudo-random states are drawn anew on its first turn.
    pub async fn fork(&self, id: &str) -> Result<Arc<Session>> {
        self.check_open()?;
        let source = self.get(id).await?;
        let image = source.capture().await?;
        let request = CreateRequest::default();
        let fork = self
            .restore(image, &request, Provenance::Fork(source.dir.clone()))
            .await?;
        // What the parent's guest may reach, its fork may too.
        fork.door.grant(source.door.grants().as_ref().clone());
        Ok(fork)
    }

    /// Stores the state and files of session `id` as a snapshot.
    pub async fn snapshot(&self, id: &str) -> Result<SnapshotInfo> {
        let image = self.image_with_files(id).await?;
        self.inner.snapshots.save(image).await
    }

    /// The state and files of session `id`, as bytes another manager can import.
    pub async fn export(&self, id: &str) -> Result<Vec<u8>> {
        let image = self.image_with_files(id).await?;
        blocking(move || {
            let mut bytes = Vec::new();
            image
                .encode(&mut bytes)
                .map_err(|e| Error::Io("encoding the export".into(), e))?;
            Ok(bytes)
        })
        .await
    }

    /// A new session from bytes made by [`export`](Self::export), here or on another
    /// manager, decoded as they arrive from `body`: the export is never held whole, only the
    /// image it makes (within this manager's bounds). At most [`DECODING`](super::DECODING)
    /// imports are read at once; the others wait with their bodies unread.
    pub async fn import<S>(&self, body: S) -> Result<Arc<Session>>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        self.check_open()?;
        let (max_memory, max_files) = self.image_bounds();
        let limit = self.import_limit() as u64;
        let _decoding = self.decoding_slot().await?;
        let input = SyncIoBridge::new(StreamReader::new(Box::pin(body)));
        let image =
            blocking(move || Image::decode(input.take(limit), max_memory, max_files)).await?;
        self.restore(image, &CreateRequest::default(), Provenance::Elsewhere)
            .await
    }

    async fn image_with_files(&self, id: &str) -> Result<Image> {
        let session = self.get(id).await?;
        let mut image = session.capture().await?;
        let (dir, quota) = (session.dir.clone(), session.limits.workspace_bytes);
        image.files = blocking(move || image::read_dirs(&dir, quota)).await?;
        Ok(image)
    }

    /// The stored snapshots.
    pub fn snapshots(&self) -> &SnapshotStore {
        &self.inner.snapshots
    }

    /// Starts a session from `image`, with the request's limits over the image's (checked
    /// unless it is a fork's); its files are the image's own, or copied from a fork's parent.
    pub(super) async fn restore(
        &self,
        image: Image,
        request: &CreateRequest,
        provenance: Provenance,
    ) -> Result<Arc<Session>> {
        self.check_open()?;
        if request.env.is_some() {
            return Err(Error::InvalidRequest(
                "env cannot be given with from_snapshot: the interpreter keeps its own".into(),
            ));
        }
        let runtime = self.runtime(&request.runtime_name(&image.runtime)?)?;
        if runtime.name != image.runtime || runtime.digest != image.module {
            return Err(Error::ModuleMismatch(
                short_digest(&image.module),
                short_digest(&runtime.digest),
            ));
        }
        let (base, reseed, copy_from) = match provenance {
            Provenance::Fork(parent) => (image.limits, true, Some(parent)),
            Provenance::Elsewhere => (self.image_limits(image.limits, &runtime)?, false, None),
        };
        let limits = self.limits(request, &runtime, base)?;
        let metadata = request.metadata.clone().unwrap_or_default();
        super::request::check_metadata(&metadata)?;
        let grants = self.grants(request)?;
        if limits.memory_bytes < image.memory_bytes {
            return Err(Error::InvalidRequest(format!(
                "the snapshot's memory is {} MiB, above the memory_mib asked for",
                image.memory_bytes.div_ceil(1 << 20)
            )));
        }
        let permit = self.acquire_slot().await?;
        let origin = Origin {
            image: Arc::new(image),
            reseed,
        };
        let session = self
            .start(
                None,
                runtime,
                limits,
                vec![],
                permit,
                false,
                Some((origin, copy_from)),
            )
            .await?;
        session.set_metadata(metadata);
        session.door.grant(grants);
        self.adopt(&session);
        Ok(session)
    }
}

/// The first 12 hex digits of a digest, as errors show it.
fn short_digest(digest: &str) -> String {
    digest.chars().take(12).collect()
}
