//! The catalog of guest runtimes: how each is fetched, verified, compiled once and driven.
//!
//! A runtime is a WebAssembly reactor that follows ARL's turn contract:
//! - exports `memory`, `turn(ptr: i32, len: i32) -> i32` and `host_alloc(len: i32) -> i32`;
//! - imports `host::call(ptr, len, out_ptr_ptr, out_len_ptr) -> i32`, the door through which
//!   a turn reports its outcome as one JSON frame ([`Report`]);
//! - is otherwise a plain `wasm32-wasip1` module.
//!
//! Python ([`python`]) and JavaScript ([`javascript`]) are ARL's own; the test guests of
//! `wasm-guests/` are others.

pub mod cache;
pub mod javascript;
pub mod python;

use std::path::PathBuf;

pub use cache::{ModuleCache, Progress};

/// Why a runtime could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Fetch {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path} has sha256 {actual}, expected {expected}")]
    Digest {
        path: PathBuf,
        expected: &'static str,
        actual: String,
    },
    #[error("reading {path}: {source}")]
    Zip {
        path: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("compiling {path}: {source}")]
    Compile {
        path: PathBuf,
        #[source]
        source: wasmtime::Error,
    },
    #[error("{path} is not a runtime module: {reason}")]
    Contract { path: PathBuf, reason: String },
    #[error(
        "{path} is not the file this cache compiled (its sha256 differs from the one recorded)"
    )]
    Unverified { path: PathBuf },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A directory of the host that every session of a runtime sees read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub guest: String,
}

/// How the manager talks to a runtime's `turn` export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The turn input is the user's code as it is; a report frame is optional.
    Raw,
    /// CPython with ARL's driver: a bootstrap turn installs it, then each turn calls it.
    Python,
    /// ARL's JavaScript engine: each turn is a JSON request, a bootstrap turn gives it its
    /// environment. `typescript`: cells are TypeScript, their types stripped by the host.
    JavaScript { typescript: bool },
}

impl Protocol {
    /// The code of the turn that prepares a new session with environment `env`, if the
    /// runtime needs one.
    pub fn bootstrap(self, env: &[(String, String)]) -> Option<String> {
        match self {
            Protocol::Raw => None,
            Protocol::Python => Some(python::bootstrap_source(env)),
            Protocol::JavaScript { .. } => Some(javascript::bootstrap_input(env)),
        }
    }

    /// Whether new sessions run a bootstrap turn (and so gain from being started ahead).
    pub fn has_bootstrap(self) -> bool {
        matches!(self, Protocol::Python | Protocol::JavaScript { .. })
    }

    /// The bytes handed to `turn` for the user's `code`, the session's `n`th execution, whose
    /// result and error fields the guest cuts to `cap` bytes each. `reseed` draws the guest's
    /// pseudo-random states anew first (a fork's first turn: its copied states would repeat
    /// its parent's draws).
    ///
    /// `context` names a namespace of the session other than its own, and the folder its
    /// cells start in; a runtime without contexts ignores it.
    pub fn encode_turn(
        self,
        code: &str,
        n: u64,
        cap: usize,
        reseed: bool,
        context: Option<&Context>,
    ) -> Vec<u8> {
        match self {
            Protocol::Raw => code.as_bytes().to_vec(),
            Protocol::Python if reseed => {
                let turn = python::turn_source(code, n, cap, context);
                format!("{}\n{turn}", python::RESEED).into_bytes()
            }
            Protocol::Python => python::turn_source(code, n, cap, context).into_bytes(),
            Protocol::JavaScript { typescript } => {
                javascript::turn_input(code, typescript, n, cap, reseed, context)
            }
        }
    }

    /// Whether a session of this runtime can hold contexts, namespaces beside its own.
    pub fn has_contexts(self) -> bool {
        self.forget_context(None).is_some()
    }

    /// The code of the turn that starts `context`'s namespace over (`None`: the session's
    /// own), when the runtime has contexts.
    pub fn forget_context(self, context: Option<&str>) -> Option<String> {
        match self {
            Protocol::Raw => None,
            Protocol::Python => Some(python::forget_source(context)),
            Protocol::JavaScript { .. } => Some(javascript::forget_source(context)),
        }
    }
}

/// A namespace of a session beside its own (E2B's code contexts): its id and the folder, as the
/// guest sees it, its cells start in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub id: String,
    pub cwd: String,
}

/// What a turn reported through the door: the final expression's repr, an uncaught
/// exception, or an exit status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct Report {
    pub result: Option<String>,
    pub error: Option<GuestError>,
    pub exit: Option<i64>,
    /// The guest cut `result`, `error` or `results` to the cap it was given.
    pub clipped: bool,
    /// What the turn displayed, as MIME bundles in order, the final expression's last
    /// (`"is_main_result": true`).
    pub results: Vec<Bundle>,
}

/// One displayed value as Jupyter carries it: MIME type to content (`text/plain`, `text/html`,
/// `image/png` in base64, `application/json` as JSON...), and `is_main_result`.
pub type Bundle = serde_json::Map<String, serde_json::Value>;

/// An exception the user's code raised and did not catch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct GuestError {
    /// The exception's class name, e.g. `ZeroDivisionError`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    /// Formatted as Python prints it; empty when there is none.
    pub traceback: String,
}

impl Report {
    /// Parses one report frame; `None` when the frame is not a report.
    pub fn parse(frame: &[u8]) -> Option<Report> {
        serde_json::from_slice(frame).ok()
    }
}
