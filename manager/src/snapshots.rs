//! The snapshot store: images kept on disk, one file each, under ids clients name.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::image::format::read_header;
use crate::image::{Header, Image};
use crate::{Error, Result};

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
