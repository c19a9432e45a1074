//! Compile a module once, keep the `.cwasm`, load it with `deserialize` afterwards.

use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use crate::{Error, Result, io};

/// Where a slow step reports what it is doing (the manager prints it on stderr).
pub type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// A directory of precompiled modules, keyed by the module's sha256, the wasmtime version and
/// the engine's compilation settings, so a `.cwasm` is only ever loaded by an engine that
/// could have written it. Beside each `.cwasm` is the sha256 it was written with
/// (`.cwasm.sha256`): loading one is wasmtime's unsafe `deserialize`, so a file that does not
/// match its recorded digest (damaged, or changed since) is never loaded, and is compiled anew.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
}

impl ModuleCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The module at `wasm`, compiled at most once per key across processes (a file lock
    /// keeps two managers from compiling it side by side). `digest` is the file's sha256 when
    /// the caller has already verified it (a pinned artifact), so it is not read twice.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &Path,
        digest: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<Module> {
        let digest = match digest {
            Some(known) => known.to_owned(),
            None => sha256_file(wasm)?,
        };
        let path = self.dir.join(format!("{}.cwasm", key(engine, &digest)));
        // A baked, read-only cache (a container image) is read without taking the lock.
        if path.exists()
            && let Ok(module) = deserialize(engine, &path)
        {
            return Ok(module);
        }
        let lock =
            fs::create_dir_all(&self.dir).and_then(|()| File::create(path.with_extension("lock")));
        let lock = match lock {
            Ok(lock) => lock,
            Err(e) => {
                // Nowhere to keep it: compile for this process only.
                tracing::warn!(dir = %self.dir.display(), error = %e, "the module cache is not writable; compiling in memory");
                progress(&format!("compiling {} (not cached: {e})", wasm.display()));
                return Module::from_file(engine, wasm).map_err(|source| Error::Compile {
                    path: wasm.to_owned(),
                    source,
                });
            }
        };
        lock.lock().map_err(io(format!(
            "locking {}",
            path.with_extension("lock").display()
        )))?;
        if path.exists() {
            match deserialize(engine, &path) {
                Ok(module) => return Ok(module),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "discarding a stale .cwasm");
                }
            }
        }
        progress(&format!(
            "compiling {} once (about a minute; cached as {})",
            wasm.display(),
            path.display()
        ));
        let started = std::time::Instant::now();
        let bytes = fs::read(wasm).map_err(io(format!("reading {}", wasm.display())))?;
        let compiled = engine
            .precompile_module(&bytes)
            .map_err(|source| Error::Compile {
                path: wasm.to_owned(),
                source,
            })?;
        drop(bytes);
        let staged = path.with_extension("cwasm.tmp");
        fs::write(&staged, &compiled).map_err(io(format!("writing {}", staged.display())))?;
        let recorded = digest_path(&path);
        fs::write(&recorded, hex::encode(Sha256::digest(&compiled)))
            .map_err(io(format!("writing {}", recorded.display())))?;
        fs::rename(&staged, &path).map_err(io(format!("renaming {}", staged.display())))?;
        progress(&format!(
            "compiled in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        // Its digest is the one just recorded: no need to read it back to check.
        deserialize_unchecked(engine, &path)
    }
}

/// Where the sha256 of the `.cwasm` at `path` is recorded.
fn digest_path(path: &Path) -> PathBuf {
    path.with_extension("cwasm.sha256")
}

/// Loads the `.cwasm` at `path` if its bytes match the digest recorded beside it.
fn deserialize(engine: &Engine, path: &Path) -> Result<Module> {
    let recorded = fs::read_to_string(digest_path(path)).unwrap_or_default();
    let actual = sha256_file(path)?;
    if recorded.trim() != actual {
        return Err(Error::Unverified {
            path: path.to_owned(),
        });
    }
    deserialize_unchecked(engine, path)
}

/// Loads the `.cwasm` at `path`, whose bytes the caller knows to be the ones this cache wrote.
fn deserialize_unchecked(engine: &Engine, path: &Path) -> Result<Module> {
    // SAFETY: the file is one this cache wrote with `Engine::precompile_module` under a key
    // that names this wasmtime version and this engine's settings, in a directory owned by
    // the user running the manager, and its bytes are the ones it wrote (checked against the
    // recorded digest, or written just now); wasmtime checks the header and settings again.
    #[allow(
        unsafe_code,
        reason = "loading our own precompiled .cwasm is wasmtime's unsafe API"
    )]
    let module = unsafe { Module::deserialize_file(engine, path) };
    module.map_err(|source| Error::Compile {
        path: path.to_owned(),
        source,
    })
}

fn key(engine: &Engine, digest: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!(
        "{}-wasmtime{}-{:016x}",
        &digest[..32],
        wasmtime_version(),
        hasher.finish()
    )
}

/// The wasmtime version this build links, part of every cache key.
pub fn wasmtime_version() -> &'static str {
    // NOTE: keep in step with the `wasmtime` requirement in the workspace Cargo.toml.
    "48"
}

/// The lowercase hex sha256 of a file, read in chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use std::sync::Mutex;

    use super::*;

    /// The smallest module: the magic and version, no sections.
    const EMPTY_MODULE: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn a_cwasm_that_is_not_what_was_compiled_is_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("m.wasm");
        fs::write(&wasm, EMPTY_MODULE).unwrap();
        let cache = ModuleCache::new(dir.path().join("modules"));
        let engine = Engine::default();
        let said = Mutex::new(Vec::<String>::new());
        let progress = |step: &str| said.lock().unwrap().push(step.to_owned());
        let compiles = || {
            said.lock()
                .unwrap()
                .iter()
                .filter(|s| s.starts_with("compiling"))
                .count()
        };
        cache.load(&engine, &wasm, None, &progress).unwrap();
        assert_eq!(compiles(), 1);
        cache.load(&engine, &wasm, None, &progress).unwrap();
        assert_eq!(
            compiles(),
            1,
            "a sound .cwasm is loaded, not compiled again"
        );

        let cwasm = fs::read_dir(dir.path().join("modules"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .unwrap();
        let mut bytes = fs::read(&cwasm).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&cwasm, &bytes).unwrap();
        assert!(matches!(
            deserialize(&engine, &cwasm),
            Err(Error::Unverified { .. })
        ));
        cache.load(&engine, &wasm, None, &progress).unwrap();
        assert_eq!(
            compiles(),
            2,
            "a changed .cwasm is compiled anew, not loaded"
        );
        fs::remove_file(digest_path(&cwasm)).unwrap();
        cache.load(&engine, &wasm, None, &progress).unwrap();
        assert_eq!(compiles(), 3, "one without its recorded digest too");
    }
}
