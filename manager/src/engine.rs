//! The one place where `wasmtime::Config` is made: pooling allocator sized from
//! `max_sessions`, copy-on-write memory images, epoch interruption with a ticker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::{Error, Result};

/// How often the epoch advances. A running guest yields to the scheduler at each tick, which
/// is how a deadline, a cancel or a neighbour's turn gets its chance.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The wasm stack a guest may use (CPython recurses deeply: the package's own host uses 8 MiB).
pub const WASM_STACK: usize = 8 << 20;

/// Elements of the biggest funcref table a pooled instance may have (CPython's is ~47k).
const TABLE_ELEMENTS: usize = 1 << 16;

/// Settings that decide the engine's shape. Everything else about a session is per store.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// Pooled instance slots: at most this many sessions exist at once.
    pub max_sessions: u32,
    /// The largest linear memory a session may grow to, in bytes.
    pub max_memory_bytes: u64,
}

/// The process-wide engine and its epoch ticker, stopped when this is dropped.
pub struct SandboxEngine {
    engine: Engine,
    ticker_stop: Arc<AtomicBool>,
}

impl SandboxEngine {
    pub fn new(settings: EngineSettings) -> Result<Self> {
        let engine = Engine::new(&config(settings)).map_err(Error::Engine)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (weak, stop) = (engine.weak(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("arl-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| Error::Engine(e.into()))?;
        Ok(Self {
            engine,
            ticker_stop,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for SandboxEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn config(settings: EngineSettings) -> Config {
    let slots = settings.max_sessions.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_core_instances(slots)
        // Two memories a session: its linear memory and the GC heap that exceptions live in.
        .total_memories(slots.saturating_mul(2))
        .total_tables(slots)
        // A fiber stack is taken only while a turn runs, but each session may be mid-turn.
        .total_stacks(slots)
        // And one GC heap each (exceptions live there); the default caps the pool at 1,000.
        .total_gc_heaps(slots)
        .total_component_instances(0)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .table_elements(TABLE_ELEMENTS)
        // CPython's instance context (a VMFuncRef per escaping function of ~89k) is a few MiB.
        .max_core_instance_size(16 << 20)
        .max_memory_size(settings.max_memory_bytes as usize)
        // Give a slot's pages back to the kernel when its session ends: an idle pod holds
        // only what its live sessions touched.
        .linear_memory_keep_resident(0)
        .table_keep_resident(0);
    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_init_cow(true)
        .epoch_interruption(true)
        .wasm_exceptions(true)
        .max_wasm_stack(WASM_STACK)
        .async_stack_size(WASM_STACK + (1 << 20));
    config
}
