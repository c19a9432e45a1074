//! Runtimes pre-initialised into ARL's own snapshots, captured with wasmtime-wizer:
//! - CPython: the package's plain `python.wasm`, initialised and with the scientific stack
//!   imported. Every session then starts with numpy and pandas already in memory
//!   (copy-on-write), instead of paying about a second to import them.
//! - JavaScript: ARL's Boa reactor with its engine built and its prelude run.
//!
//! A snapshot is built once per cache (about two minutes for Python, seconds for JavaScript:
//! the instrumented module is compiled, run, and its memory written out) and reused by every
//! later start.
//!
//! What Python's freezes: the interpreter's string hash seed (as the package's snapshot did), and
//! the state of every module it imported, ARL's driver among them. Each session's bootstrap
//! turn (`_arl.start`) gives it its own environment and reseeds `random` and `numpy.random`.

use std::fs::File;
use std::path::{Path, PathBuf};

use arl_runtimes::Progress;
use arl_runtimes::python::Artifacts;
use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, Linker, Module, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::output::{Capture, Stream};
use crate::runtime::{Reports, host_call};
use crate::{Error, Result};

/// What the snapshot imports, after the interpreter's own initialisation. Each of these pays
/// for itself: numpy ~0.3 s and pandas ~1 s per fresh session otherwise.
pub const PRELOAD: &[&str] = &["numpy", "pandas"];

/// Bumped when the way the snapshot is made changes, so that caches rebuild it.
const RECIPE: &str = "arl-snapshot-7 wasmtime-wizer-48";

struct InitState {
    wasi: WasiP1Ctx,
    report: Option<Vec<u8>>,
}

impl Reports for InitState {
    fn report(&mut self, frame: Vec<u8>) {
        self.report = Some(frame);
    }
}

/// What a snapshot is made of: a reactor module, what it is given while it initialises, and the
/// turns run in it before its memory is captured.
struct Recipe<'a> {
    /// The runtime's name, for file names and progress lines.
    name: &'a str,
    wasm: &'a [u8],
    argv0: &'a str,
    env: &'a [(&'a str, &'a str)],
    mounts: &'a [arl_runtimes::Mount],
    /// `(what, input)`: turns that must each report `ok`.
    steps: Vec<(&'a str, String)>,
    /// Everything above that the module's bytes do not say, for the cache key.
    salt: Vec<&'a str>,
    /// What the progress line says while it is built.
    building: String,
}

/// The snapshot module for `artifacts` and its sha256, built into `cache_dir/snapshots` first
/// if missing. Blocking.
pub fn python(
    artifacts: &Artifacts,
    cache_dir: &Path,
    progress: Progress<'_>,
) -> Result<(PathBuf, String)> {
    let wasm = std::fs::read(&artifacts.plain)
        .map_err(|e| Error::Io(format!("reading {}", artifacts.plain.display()), e))?;
    // The preload, then ARL's driver, then everything alive is moved out of the collector's
    // reach (`gc.freeze`): a collection in a session then never walks, and so never
    // dirties, the snapshot's pages.
    let preload = format!("import {}", PRELOAD.join(", "));
    let steps = [
        ("importing", preload.as_str()),
        ("installing the driver", arl_runtimes::python::DRIVER),
        ("freezing", "import gc\ngc.collect()\ngc.freeze()\ndel gc"),
    ];
    let steps = steps
        .into_iter()
        .map(|(what, code)| {
            let code = format!(
                "try:\n    exec({})\n    _r = b'ok'\nexcept BaseException as e:\n    _r = repr(e).encode()\n\
                 __import__('_host').call(_r)\ndel _r\n",
                serde_json::to_string(code).unwrap_or_default()
            );
            (what, code)
        })
        .collect();
    let mut salt = vec![
        arl_runtimes::python::PLAIN_SHA256,
        arl_runtimes::python::DRIVER,
    ];
    salt.extend(PRELOAD);
    salt.extend(artifacts.mounts.iter().map(|m| m.guest.as_str()));
    snapshot(
        Recipe {
            name: "python",
            wasm: &wasm,
            argv0: "/usr/local/bin/python.wasm",
            env: arl_runtimes::python::BASE_ENV,
            mounts: &artifacts.mounts,
            steps,
            salt,
            building: format!(
                "building ARL's Python snapshot with {} imported (once, about two minutes)",
                PRELOAD.join(", ")
            ),
        },
        cache_dir,
        progress,
    )
}

/// ARL's JavaScript runtime with its engine built and its prelude run, and its sha256, built
/// into `cache_dir/snapshots` first if missing (a few seconds). Blocking.
pub fn javascript(cache_dir: &Path, progress: Progress<'_>) -> Result<(PathBuf, String)> {
    snapshot(
        Recipe {
            name: "javascript",
            wasm: arl_runtimes::javascript::WASM,
            argv0: "/usr/local/bin/arl-javascript.wasm",
            env: arl_runtimes::javascript::BASE_ENV,
            mounts: &[],
            steps: Vec::new(),
            salt: Vec::new(),
            building: "building ARL's JavaScript snapshot (once, seconds)".into(),
        },
        cache_dir,
        progress,
    )
}

fn snapshot(
    recipe: Recipe<'_>,
    cache_dir: &Path,
    progress: Progress<'_>,
) -> Result<(PathBuf, String)> {
    let name = recipe.name;
    let key = {
        let mut h = Sha256::new();
        h.update(Sha256::digest(recipe.wasm));
        h.update(RECIPE);
        for part in recipe.salt.iter().chain(std::iter::once(&recipe.argv0)) {
            h.update(part);
            h.update([0]);
        }
        for (what, input) in &recipe.steps {
            h.update(what);
            h.update(input);
            h.update([0]);
        }
        hex::encode(&h.finalize()[..12])
    };
    let dir = cache_dir.join("snapshots");
    let path = dir.join(format!("{name}-{key}.wasm"));
    let digest_path = path.with_extension("wasm.sha256");
    let io = |what: String| move |e| Error::Io(what, e);
    let built = || {
        std::fs::read_to_string(&digest_path)
            .ok()
            .filter(|_| path.exists())
    };
    if let Some(digest) = built() {
        return Ok((path, digest));
    }
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let lock_path = dir.join(format!("{name}-{key}.lock"));
    let lock = File::create(&lock_path).map_err(io(format!("opening {}", lock_path.display())))?;
    lock.lock()
        .map_err(io(format!("locking {}", lock_path.display())))?;
    if let Some(digest) = built() {
        return Ok((path, digest)); // another process built it while we waited
    }
    progress(&recipe.building);
    let started = std::time::Instant::now();
    // On a thread of its own: WASI's blocking calls during the build run their own tokio
    // runtime, which cannot start inside a caller's (a test, `serve`), whoever asks first.
    let wasm = std::thread::scope(|scope| {
        scope
            .spawn(|| build(&recipe, &dir))
            .join()
            .unwrap_or_else(|_| {
                Err(Error::Instantiate(wasmtime::format_err!(
                    "building the snapshot panicked"
                )))
            })
    })?;
    let partial = path.with_extension("partial");
    std::fs::write(&partial, &wasm).map_err(io(format!("writing {}", partial.display())))?;
    std::fs::rename(&partial, &path).map_err(io(format!("moving to {}", path.display())))?;
    let digest = hex::encode(Sha256::digest(&wasm));
    std::fs::write(&digest_path, &digest)
        .map_err(io(format!("writing {}", digest_path.display())))?;
    progress(&format!(
        "{name} snapshot built in {:.0} s ({} MB)",
        started.elapsed().as_secs_f64(),
        wasm.len() >> 20
    ));
    Ok((path, digest))
}

fn build(recipe: &Recipe<'_>, scratch: &Path) -> Result<Vec<u8>> {
    let mut wizer = wasmtime_wizer::Wizer::new();
    wizer.init_func("wizer.initialize");
    let (cx, instrumented) = wizer.instrument(recipe.wasm).map_err(Error::Engine)?;

    let mut config = Config::new();
    config.wasm_exceptions(true).wasm_gc(true);
    let engine = Engine::new(&config).map_err(Error::Engine)?;
    let module = Module::new(&engine, &instrumented).map_err(Error::Engine)?;
    drop(instrumented);
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut InitState| &mut s.wasi)
        .map_err(Error::Engine)?;
    linker
        .func_wrap("host", "call", host_call::<InitState>)
        .map_err(Error::Engine)?;

    // The same preopens, in the same order, as a session has (`session::store::preopen`).
    let empty = tempfile::Builder::new()
        .prefix("snapshot-")
        .tempdir_in(scratch)
        .map_err(|e| Error::Io("making the snapshot's scratch folders".into(), e))?;
    let (workspace, tmp) = (empty.path().join("workspace"), empty.path().join("tmp"));
    for d in [&workspace, &tmp] {
        std::fs::create_dir_all(d)
            .map_err(|e| Error::Io(format!("creating {}", d.display()), e))?;
    }
    let stderr = Capture::new(Stream::Stderr);
    stderr.reset(64 << 10, None);
    let mut wasi = WasiCtxBuilder::new();
    wasi.stderr(stderr.clone())
        .arg(recipe.argv0)
        .envs(recipe.env);
    crate::session::store::preopen(&mut wasi, recipe.mounts, &workspace, &tmp)?;
    let mut store = Store::new(
        &engine,
        InitState {
            wasi: wasi.build_p1(),
            report: None,
        },
    );
    let instance = linker
        .instantiate(&mut store, &module)
        .map_err(Error::Instantiate)?;
    let failed = |what: &str, e: wasmtime::Error| {
        let (err, _) = stderr.take();
        Error::Instantiate(e.context(format!(
            "{what} (stderr: {})",
            String::from_utf8_lossy(&err).trim()
        )))
    };
    for init in ["_initialize", "wizer.initialize"] {
        if let Ok(f) = instance.get_typed_func::<(), ()>(&mut store, init) {
            f.call(&mut store, ()).map_err(|e| failed(init, e))?;
        }
    }
    for (what, input) in &recipe.steps {
        turn(&mut store, &instance, input.as_bytes()).map_err(|e| failed(what, e))?;
        match store.data_mut().report.take() {
            Some(frame) if frame == b"ok" => {}
            other => {
                let said = other.map(|f| String::from_utf8_lossy(&f).into_owned());
                return Err(failed(what, wasmtime::format_err!("it failed: {said:?}")));
            }
        }
    }
    let mut state = Snapshotting {
        store: &mut store,
        instance,
    };
    let snapshot =
        wasmtime_wasi::runtime::in_tokio(wizer.snapshot(&cx, &mut state)).map_err(Error::Engine)?;
    Ok(snapshot)
}

/// Runs `code` through the reactor's `turn` export.
fn turn(
    store: &mut Store<InitState>,
    instance: &wasmtime::Instance,
    code: &[u8],
) -> wasmtime::Result<()> {
    let memory = instance
        .get_memory(&mut *store, "memory")
        .ok_or_else(|| wasmtime::format_err!("no memory export"))?;
    let alloc = instance.get_typed_func::<i32, i32>(&mut *store, "host_alloc")?;
    let turn = instance.get_typed_func::<(i32, i32), i32>(&mut *store, "turn")?;
    let len = i32::try_from(code.len())?;
    let ptr = alloc.call(&mut *store, len)?;
    memory.write(&mut *store, ptr as u32 as usize, code)?;
    turn.call(&mut *store, (ptr, len))?;
    Ok(())
}

struct Snapshotting<'a> {
    store: &'a mut Store<InitState>,
    instance: wasmtime::Instance,
}

impl wasmtime_wizer::InstanceState for Snapshotting<'_> {
    async fn global_get(
        &mut self,
        name: &str,
        _: wasmtime_wizer::ValType,
    ) -> wasmtime_wizer::SnapshotVal {
        use wasmtime::Val;
        use wasmtime_wizer::SnapshotVal;
        let value = self
            .instance
            .get_global(&mut *self.store, name)
            .map(|g| g.get(&mut *self.store));
        match value {
            Some(Val::I32(x)) => SnapshotVal::I32(x),
            Some(Val::I64(x)) => SnapshotVal::I64(x),
            Some(Val::F32(x)) => SnapshotVal::F32(x),
            Some(Val::F64(x)) => SnapshotVal::F64(x),
            Some(Val::V128(x)) => SnapshotVal::V128(x.as_u128()),
            // Wizer only asks for the numeric globals it instrumented.
            _ => SnapshotVal::I32(0),
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        match self.instance.get_memory(&mut *self.store, name) {
            Some(memory) => contents(memory.data(&*self.store)),
            None => contents(&[]),
        }
    }
}
