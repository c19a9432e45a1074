//! The runtimes a manager serves: loaded (compiled once, cached) before any session of them.

use std::sync::Arc;

use arl_runtimes::Progress;

use super::{Registry, read, write};
use crate::runtime::{Runtime, RuntimeSpec};
use crate::session::Session;
use crate::{Error, Result};

/// What a create may ask of this manager, which the derived document cannot know.
#[derive(Debug, Clone, Default)]
pub struct DocumentFacts {
    /// The runtimes it serves (or is loading), with the languages each runs and the least
    /// memory each needs, in MiB (`None` while loading).
    pub runtimes: Vec<(String, Vec<&'static str>, Option<u64>)>,
    pub max_memory_mib: u64,
    pub max_timeout_ms: u64,
    /// The most a session's network may spend (`--network-max-bytes`, `--network-max-requests`).
    pub network_max: (u64, u64),
}

/// Every language name a create may give (`language`), for some runtime.
const LANGUAGES: [&str; 6] = ["python", "python3", "javascript", "js", "typescript", "ts"];

/// The runtimes a manager can serve, by the name sessions ask for.
pub const RUNTIMES: &[&str] = &["python", "javascript"];

impl Registry {
    /// Loads a runtime (compiling it on first use) and makes it available to new sessions.
    /// Blocking: call it from a blocking thread.
    pub fn load_runtime(&self, spec: RuntimeSpec, progress: Progress<'_>) -> Result<()> {
        let runtime = Runtime::load(
            self.inner.engine.engine(),
            &self.inner.cache,
            spec,
            progress,
        )?;
        self.inner.egress.wheels.add_runtime(&runtime.mounts);
        write(&self.inner.runtimes).insert(runtime.name.clone(), Arc::new(runtime));
        Ok(())
    }

    /// Fetches, verifies, snapshots and loads CPython. Blocking, about three minutes the
    /// first time.
    pub fn load_python(&self, progress: Progress<'_>) -> Result<()> {
        let cache_dir = &self.inner.config.cache_dir;
        let artifacts = arl_runtimes::python::fetch(cache_dir, progress)?;
        let (snapshot, digest) = crate::preinit::python(&artifacts, cache_dir, progress)?;
        self.load_runtime(RuntimeSpec::python(artifacts, snapshot, digest), progress)
    }

    /// Builds (once, seconds) and loads ARL's JavaScript runtime, as `javascript` and as
    /// `typescript` (the same module; its cells' types stripped first). Blocking.
    pub fn load_javascript(&self, progress: Progress<'_>) -> Result<()> {
        let (snapshot, digest) =
            crate::preinit::javascript(&self.inner.config.cache_dir, progress)?;
        for typescript in [false, true] {
            let spec = RuntimeSpec::javascript(snapshot.clone(), digest.clone(), typescript);
            self.load_runtime(spec, progress)?;
        }
        Ok(())
    }

    /// Loads the runtime `name`, one of [`RUNTIMES`]. Blocking.
    pub fn load_named(&self, name: &str, progress: Progress<'_>) -> Result<()> {
        match name {
            "python" => self.load_python(progress),
            "javascript" => self.load_javascript(progress),
            other => Err(Error::UnknownRuntime(other.to_owned(), RUNTIMES.join(", "))),
        }
    }

    /// What the OpenAPI document should say of this manager's creates: its runtimes (loaded
    /// or loading), their languages and memory floors, and its ceilings.
    pub fn document_facts(&self) -> DocumentFacts {
        let runtimes = read(&self.inner.runtimes);
        let mut names: Vec<String> = runtimes.keys().cloned().collect();
        for loading in read(&self.inner.loading).iter() {
            let served: &[&str] = match loading.as_str() {
                "javascript" => &["javascript", "typescript"],
                other => &[other],
            };
            names.extend(served.iter().map(|s| (*s).to_owned()));
        }
        names.sort();
        names.dedup();
        let config = &self.inner.config;
        DocumentFacts {
            runtimes: names
                .into_iter()
                .map(|name| {
                    // The languages a create may name with it, as a create reads them.
                    let languages = LANGUAGES
                        .into_iter()
                        .filter(|language| {
                            let asked = super::CreateRequest {
                                runtime: Some(name.clone()),
                                language: Some((*language).to_owned()),
                                ..super::CreateRequest::default()
                            };
                            asked.runtime_name("python").is_ok()
                        })
                        .collect();
                    let min = runtimes
                        .get(&name)
                        .map(|r| r.min_memory_bytes.div_ceil(1 << 20));
                    (name, languages, min)
                })
                .collect(),
            max_memory_mib: config.max_memory_bytes >> 20,
            max_timeout_ms: u64::try_from(config.max_timeout.as_millis()).unwrap_or(u64::MAX),
            network_max: (config.network.max_bytes, config.network.max_requests),
        }
    }

    /// Says which runtimes are on their way, so that until each is loaded a create for it
    /// answers "not ready" and the manager is not ready.
    pub fn expect_runtimes(&self, names: &[String]) {
        *write(&self.inner.loading) = names.to_vec();
    }

    /// Whether a runtime is loaded and none is still on its way.
    pub fn ready(&self) -> bool {
        let runtimes = read(&self.inner.runtimes);
        !runtimes.is_empty()
            && read(&self.inner.loading)
                .iter()
                .all(|name| runtimes.contains_key(name))
    }

    /// Whether a runtime of this name is loaded.
    pub fn has_runtime(&self, name: &str) -> bool {
        read(&self.inner.runtimes).contains_key(name)
    }

    /// Whether sessions of the runtime `name` can hold contexts beside their own namespace.
    pub fn has_contexts(&self, name: &str) -> bool {
        read(&self.inner.runtimes)
            .get(name)
            .is_some_and(|r| r.protocol.has_contexts())
    }

    /// Starts a context of `session` over (`None`: its own namespace), as a turn of its own:
    /// its variables are dropped.
    pub async fn forget_context(&self, session: &Session, context: Option<&str>) -> Result<()> {
        let protocol = self.runtime(&session.runtime)?.protocol;
        let Some(code) = protocol.forget_context(context) else {
            return Err(Error::InvalidRequest(format!(
                "the {} runtime has no contexts",
                session.runtime
            )));
        };
        let outcome = session.execute(code, None, None).await?;
        match outcome.error {
            Some(e) => Err(Error::InvalidRequest(format!(
                "restarting the context failed: {}: {}",
                e.kind, e.message
            ))),
            None => Ok(()),
        }
    }

    pub(super) fn runtime(&self, name: &str) -> Result<Arc<Runtime>> {
        let runtimes = read(&self.inner.runtimes);
        let coming = || read(&self.inner.loading).iter().any(|n| n == name);
        if runtimes.is_empty() || (!runtimes.contains_key(name) && coming()) {
            return Err(Error::NotReady);
        }
        runtimes.get(name).cloned().ok_or_else(|| {
            let mut names: Vec<_> = runtimes.keys().cloned().collect();
            names.sort();
            Error::UnknownRuntime(name.to_owned(), names.join(", "))
        })
    }
}
