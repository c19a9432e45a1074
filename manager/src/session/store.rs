//! What a session's `Store` holds besides its instance: the WASI context over the session's
//! folders, the memory limiter, the guest's report frame and its clock; and the few
//! operations on a store that the session's task and the image code share.

use std::path::Path;

use wasmtime::{
    Instance, Memory, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, TypedFunc,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, HostMonotonicClock, WasiCtxBuilder, WasiView};

use crate::image::{GuestClock, Pages};
use crate::{Error, Result};

/// What a store holds besides the instance.
pub struct SessionState {
    pub(crate) wasi: WasiP1Ctx,
    limiter: Limiter,
    /// The last frame the guest sent through the door this turn.
    pub(crate) report: Option<Vec<u8>>,
    /// The largest frame kept (see [`crate::runtime::frame_limit`]).
    pub(crate) report_limit: usize,
    /// The size of a frame this turn sent over `report_limit`, left in the guest.
    pub(crate) report_refused: Option<usize>,
    clock: GuestClock,
    /// Where the guest's calls out of the sandbox are answered.
    pub(crate) door: std::sync::Arc<crate::egress::Door>,
}

impl SessionState {
    /// A guest's state with its WASI context, bounded to `memory_bytes` of linear memory and
    /// one instance, with its monotonic clock at `clock`, keeping reports of up to
    /// `report_limit` bytes.
    pub(super) fn new(
        wasi: WasiP1Ctx,
        memory_bytes: u64,
        clock: GuestClock,
        report_limit: usize,
        door: std::sync::Arc<crate::egress::Door>,
    ) -> Self {
        Self {
            wasi,
            limiter: Limiter {
                limits: StoreLimitsBuilder::new()
                    .memory_size(usize::try_from(memory_bytes).unwrap_or(usize::MAX))
                    .instances(1)
                    .memories(1)
                    .tables(1)
                    .build(),
                refused: false,
            },
            report: None,
            report_limit,
            report_refused: None,
            clock,
            door,
        }
    }

    /// The guest's monotonic clock, in nanoseconds.
    pub(super) fn clock_ns(&self) -> u64 {
        self.clock.now()
    }

    /// Forgets that memory was refused: a new turn starts.
    pub(super) fn clear_refusal(&mut self) {
        self.limiter.refused = false;
    }

    /// Whether the guest was refused memory at its limit since [`clear_refusal`](Self::clear_refusal).
    pub(super) fn memory_refused(&self) -> bool {
        self.limiter.refused
    }
}

/// A store for `state` on `engine`, its memory bounded by the state's limiter and its
/// epoch deadline yielding at every tick (deadlines are kept by the session's task).
pub(super) fn new_store(engine: &wasmtime::Engine, state: SessionState) -> Store<SessionState> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    store.epoch_deadline_async_yield_and_update(1);
    store
}

/// The store's limits, noting when the guest was refused memory.
struct Limiter {
    limits: StoreLimits,
    refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.refused |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// Gives a guest its folders: the runtime's read-only mounts, then its own `/workspace` and
/// `/tmp`. ARL's snapshot is made with the same call, because wasi-libc keeps the table of
/// preopens it saw in linear memory: a session must open the same ones in the same order.
pub(crate) fn preopen(
    wasi: &mut WasiCtxBuilder,
    mounts: &[arl_runtimes::Mount],
    workspace: &Path,
    tmp: &Path,
) -> Result<()> {
    let mounts = mounts
        .iter()
        .map(|m| (m.host.as_path(), m.guest.as_str(), FsPerms::ReadOnly));
    let own = [
        (workspace, "/workspace", FsPerms::ReadWrite),
        (tmp, "/tmp", FsPerms::ReadWrite),
    ];
    for (host, guest, perms) in mounts.chain(own) {
        wasi.preopened_dir(host, guest, perms).map_err(|e| {
            Error::Io(
                format!("opening {}", host.display()),
                std::io::Error::other(e.to_string()),
            )
        })?;
    }
    Ok(())
}

/// Grows `memory` to `bytes` and writes `pages` into it: a captured state goes back into a
/// fresh instance of the same module.
pub(super) fn restore_memory(
    store: &mut Store<SessionState>,
    memory: &Memory,
    bytes: u64,
    pages: &Pages,
) -> Result<()> {
    let have = memory.data_size(&*store) as u64;
    if bytes > have {
        memory
            .grow(&mut *store, (bytes - have).div_ceil(65536))
            .map_err(|e| Error::Instantiate(e.context("growing the memory to the image's size")))?;
    }
    pages.restore(memory.data_mut(&mut *store));
    Ok(())
}

/// Files and folders open in a WASI context: the preopens at rest, more while the guest
/// holds files (its streams and other resources are not counted).
pub(super) fn open_descriptors(store: &mut Store<SessionState>) -> usize {
    store
        .data_mut()
        .wasi
        .ctx()
        .table
        .iter_mut()
        .filter(|entry| entry.is::<wasmtime_wasi::filesystem::Descriptor>())
        .count()
}

/// The exports of the turn contract, looked up once per instance.
pub(super) struct Exports {
    pub memory: Memory,
    pub turn: TypedFunc<(i32, i32), i32>,
    pub host_alloc: TypedFunc<i32, i32>,
    /// A WASI reactor's constructor (`_initialize`), called once before the first turn.
    pub initialize: Option<TypedFunc<(), ()>>,
}

impl Exports {
    /// The contract's exports of `instance`.
    pub fn of(instance: &Instance, store: &mut Store<SessionState>) -> Result<Self> {
        (|| -> wasmtime::Result<_> {
            Ok(Exports {
                memory: instance
                    .get_memory(&mut *store, "memory")
                    .ok_or_else(|| wasmtime::format_err!("no memory export"))?,
                turn: instance.get_typed_func(&mut *store, "turn")?,
                host_alloc: instance.get_typed_func(&mut *store, "host_alloc")?,
                initialize: instance.get_typed_func(&mut *store, "_initialize").ok(),
            })
        })()
        .map_err(Error::Instantiate)
    }
}
