//! One session: a `Store` with one instance of a runtime, owned by one task that runs its
//! turns in order.
//!
//! A turn that traps, runs past its deadline, is cut short by its caller going away, or
//! blows the memory limit is rolled back: the task drops the instance and puts the state it
//! had before the turn (kept as a [`Pages`](crate::image::Pages) checkpoint, brought up to
//! date after each turn, off the reply's path) into a fresh one, and the session carries on.
//! A session created with `rollback: false` ends instead, as an `exit()` always does.
//!
//! | module | what it holds |
//! |---|---|
//! | [`types`] | the values: limits, lifecycle, end and rollback reasons, a turn's outcome |
//! | [`history`] | the session's bounded trajectory of turns |
//! | [`store`] | what a `Store` holds (WASI context, limiter, report, clock) and its preopens |
//! | [`driver`] | the task that owns the store and runs turns: where a turn runs |
//! | [`stream`] | a turn as a stream of output, then its outcome |
//! | [`handle`] | the [`Session`] every caller holds, which sends work to the task |

pub mod driver;
pub mod handle;
pub mod history;
pub mod store;
pub mod stream;
pub mod types;

pub use driver::{NewSession, Origin, start};
pub use handle::{Live, Metadata, QUEUE_DEPTH, Session};
pub use history::{HISTORY_BYTES, HistoryEntry};
pub use store::SessionState;
pub use stream::{TurnEvent, TurnStream};
pub use types::{EndReason, Info, Lifecycle, Limits, Outcome, Rollback, rfc3339};
