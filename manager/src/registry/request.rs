//! What a client may ask of a session, and the checks every door's requests go through
//! before they reach a session: limits within the manager's bounds, an environment of sane
//! size, a per-turn deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Registry;
use crate::runtime::Runtime;
use crate::session::Limits;
use crate::{Error, Result};

/// Entries a request's `env` may have, and bytes each key or value may hold.
pub const MAX_ENV: usize = 256;
pub const MAX_ENV_CHARS: usize = 32 << 10;

/// What a client asks for when it creates a session; every field optional.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The runtime's name (`"python"`, `"javascript"`); `"python"` when absent.
    #[schema(example = "python")]
    pub runtime: Option<String>,
    /// The language of the cells, when the runtime runs more than one: `"typescript"` (or
    /// `"ts"`) on the `javascript` runtime strips types before each cell runs (the same as
    /// the runtime `"typescript"`).
    #[schema(example = "typescript")]
    pub language: Option<String>,
    /// Deadline of one execution; the manager's default when absent. At most
    /// `--max-timeout-ms` (an hour unless the manager says otherwise).
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 3_600_000)]
    pub timeout_ms: Option<u64>,
    /// Memory limit; the manager's default when absent.
    #[serde(default, deserialize_with = "whole_number")]
    pub memory_mib: Option<u64>,
    /// Added to the guest's fixed environment.
    pub env: Option<BTreeMap<String, String>>,
    /// End the session after this long unused; the manager's default when absent.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 2_592_000)]
    pub idle_ttl_secs: Option<u64>,
    /// End the session this long after its creation, even mid-turn (time spent suspended
    /// does not count); the manager's default when absent.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 2_592_000)]
    pub lifetime_secs: Option<u64>,
    /// Suspend the session to the store after this long unused (its next request resumes
    /// it, under the same id); `0`: never. The manager's `--suspend-after-secs` when absent.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 0, maximum = 2_592_000)]
    pub suspend_after_secs: Option<u64>,
    /// Roll a turn that traps, times out, is cancelled or blows the memory limit back, and
    /// carry on (`true`, the manager's default unless it runs with `--no-rollback`); or end
    /// the session (`false`).
    pub rollback: Option<bool>,
    /// Start from this snapshot's state instead of a new interpreter. Its limits are the
    /// snapshot's unless given here; `env` cannot be given (the interpreter has its own).
    #[schema(example = "snap-5f0c1b2e9d8a4c7b8e6f1a2b3c4d5e6f")]
    pub from_snapshot: Option<String>,
    /// Labels for the session, names to values, listed with it (at most 64, 1 KiB each).
    pub metadata: Option<BTreeMap<String, String>>,
    /// What the guest may reach over brokered HTTP(S); no network when absent (unless the
    /// manager runs with `--network-allow`, whose rules are then the default).
    pub network: Option<crate::egress::NetworkRequest>,
    /// Tools of the caller the guest may call, by name (`llm_query(...)`): each call is POSTed
    /// to its `url`.
    pub tools: Option<BTreeMap<String, crate::egress::ToolSpec>>,
}

/// An optional count that JSON may write as `5` or `5.0` (JSON Schema's integers include
/// both); a fraction, a negative or a non-number is refused.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::Deserialize as _;
    let Some(number) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(n) = number.as_u64() {
        return Ok(Some(n));
    }
    match number.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= 9_007_199_254_740_992.0 => {
            Ok(Some(f as u64))
        }
        _ => Err(serde::de::Error::custom(format!(
            "expected a whole number of at least 0, not {number}"
        ))),
    }
}

/// Labels a session may have, and bytes each name or value may hold.
pub const MAX_METADATA: usize = 64;
pub const MAX_METADATA_CHARS: usize = 1 << 10;

/// The longest idle TTL or lifetime a request may ask for: 30 days.
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;

impl CreateRequest {
    /// The runtime this request asks for, its `language` read: `javascript` with
    /// `typescript` is the `typescript` runtime.
    pub fn runtime_name(&self, default: &str) -> Result<String> {
        let runtime = self.runtime.as_deref().unwrap_or(default);
        let Some(language) = self.language.as_deref() else {
            return Ok(runtime.to_owned());
        };
        let name = match (runtime, language) {
            ("javascript" | "typescript", "typescript" | "ts") => "typescript",
            ("javascript", "javascript" | "js") => "javascript",
            ("python", "python" | "python3") => "python",
            (runtime, language) => {
                let runs = match runtime {
                    "javascript" => "javascript (js), typescript (ts)",
                    "typescript" => "typescript (ts)",
                    "python" => "python",
                    _ => "its own language only",
                };
                return Err(Error::UnknownLanguage(
                    runtime.to_owned(),
                    language.to_owned(),
                    runs.to_owned(),
                ));
            }
        };
        Ok(name.to_owned())
    }

    /// Whether a warm session started ahead can serve it: it asks for nothing but the defaults,
    /// a runtime, a lifetime, labels, network and tools aside (a claimed session takes those
    /// on).
    pub(super) fn is_plain(&self, defaults: &Limits) -> bool {
        self.from_snapshot.is_none()
            && self.rollback.is_none_or(|r| r == defaults.rollback)
            && self.timeout_ms.is_none()
            && self.memory_mib.is_none()
            && self.idle_ttl_secs.is_none()
            && self.env.as_ref().is_none_or(BTreeMap::is_empty)
    }
}

impl Registry {
    /// `base` (the manager's defaults, or a snapshot's limits) with the request's over it.
    pub(super) fn limits(
        &self,
        request: &CreateRequest,
        runtime: &Runtime,
        base: Limits,
    ) -> Result<Limits> {
        let config = &self.inner.config;
        let mut limits = base;
        if let Some(rollback) = request.rollback {
            limits.rollback = rollback;
        }
        if let Some(ms) = request.timeout_ms {
            if ms == 0 || Duration::from_millis(ms) > config.max_timeout {
                return Err(Error::InvalidRequest(format!(
                    "timeout_ms must be between 1 and {}",
                    config.max_timeout.as_millis()
                )));
            }
            limits.timeout = Duration::from_millis(ms);
        }
        if let Some(mib) = request.memory_mib {
            let bytes = mib.saturating_mul(1 << 20);
            if bytes < runtime.min_memory_bytes || bytes > config.max_memory_bytes {
                return Err(Error::InvalidRequest(format!(
                    "memory_mib must be between {} (the {} runtime's initial memory) and {}",
                    runtime.min_memory_bytes.div_ceil(1 << 20),
                    runtime.name,
                    config.max_memory_bytes >> 20
                )));
            }
            limits.memory_bytes = bytes;
        }
        if request.suspend_after_secs.is_some_and(|s| s > MAX_TTL_SECS) {
            return Err(Error::InvalidRequest(format!(
                "suspend_after_secs must be between 0 (never) and {MAX_TTL_SECS}"
            )));
        }
        for (name, asked, limit) in [
            ("idle_ttl_secs", request.idle_ttl_secs, &mut limits.idle_ttl),
            ("lifetime_secs", request.lifetime_secs, &mut limits.lifetime),
        ] {
            if let Some(secs) = asked {
                if secs == 0 || secs > MAX_TTL_SECS {
                    return Err(Error::InvalidRequest(format!(
                        "{name} must be between 1 and {MAX_TTL_SECS}"
                    )));
                }
                *limit = Duration::from_secs(secs);
            }
        }
        Ok(limits)
    }

    /// The limits a stored or imported image claims, checked exactly as a create's would be
    /// (an image from elsewhere is a client's request, not the manager's word): out of bounds,
    /// the image is refused (`invalid_snapshot`). The output and upload bounds are the
    /// manager's alone, so the image's are kept only where they are lower.
    pub(super) fn image_limits(&self, claimed: Limits, runtime: &Runtime) -> Result<Limits> {
        let defaults = self.inner.config.defaults;
        let as_asked = CreateRequest {
            timeout_ms: Some(u64::try_from(claimed.timeout.as_millis()).unwrap_or(u64::MAX)),
            memory_mib: Some(claimed.memory_bytes.div_ceil(1 << 20)),
            idle_ttl_secs: Some(claimed.idle_ttl.as_secs_f64().ceil() as u64),
            lifetime_secs: Some(claimed.lifetime.as_secs_f64().ceil() as u64),
            rollback: Some(claimed.rollback),
            ..CreateRequest::default()
        };
        let mut limits = self
            .limits(&as_asked, runtime, defaults)
            .map_err(|e| match e {
                Error::InvalidRequest(why) => Error::BadSnapshot(format!("its limits: {why}")),
                other => other,
            })?;
        limits.output_bytes = claimed.output_bytes.min(defaults.output_bytes);
        limits.workspace_bytes = claimed.workspace_bytes.min(defaults.workspace_bytes);
        Ok(limits)
    }

    /// Checks a per-execution deadline a client asked for (`None`: the session's own).
    pub fn check_timeout(&self, timeout_ms: Option<u64>) -> Result<Option<Duration>> {
        let max = self.inner.config.max_timeout;
        match timeout_ms {
            Some(0) => Err(Error::InvalidRequest(
                "timeout_ms must be at least 1".into(),
            )),
            Some(ms) if Duration::from_millis(ms) > max => Err(Error::InvalidRequest(format!(
                "timeout_ms must be at most {}",
                max.as_millis()
            ))),
            other => Ok(other.map(Duration::from_millis)),
        }
    }
}

/// Checks a request's labels: few and small, as a listing carries them all.
pub(super) fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<()> {
    if metadata.len() > MAX_METADATA {
        return Err(Error::InvalidRequest(format!(
            "metadata may have at most {MAX_METADATA} entries"
        )));
    }
    for (key, value) in metadata {
        let long = |s: &str| s.chars().count() > MAX_METADATA_CHARS;
        if key.is_empty() || long(key) || long(value) {
            return Err(Error::InvalidRequest(format!(
                "metadata {key:?}: names must be non-empty, names and values at most \
                 {MAX_METADATA_CHARS} characters"
            )));
        }
    }
    Ok(())
}

pub(super) fn check_env(env: BTreeMap<String, String>) -> Result<Vec<(String, String)>> {
    if env.len() > MAX_ENV {
        return Err(Error::InvalidRequest(format!(
            "env may have at most {MAX_ENV} entries"
        )));
    }
    for (key, value) in &env {
        let long = |s: &str| s.chars().count() > MAX_ENV_CHARS;
        if key.is_empty() || key.contains(['=', '\0']) || long(key) {
            return Err(Error::InvalidRequest(format!(
                "env key {key:?} must be non-empty, without '=' or NUL, at most {MAX_ENV_CHARS} characters"
            )));
        }
        if value.contains('\0') || long(value) {
            return Err(Error::InvalidRequest(format!(
                "env value of {key:?} must have no NUL and at most {MAX_ENV_CHARS} characters"
            )));
        }
    }
    Ok(env.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_and_values_are_checked() {
        let ok = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        assert_eq!(
            check_env(ok).ok(),
            Some(vec![("A".to_owned(), "1".to_owned())])
        );
        for bad in [("", "x"), ("A=B", "x"), ("A", "nul\0")] {
            let env = BTreeMap::from([(bad.0.to_owned(), bad.1.to_owned())]);
            assert!(
                matches!(check_env(env), Err(Error::InvalidRequest(_))),
                "{bad:?}"
            );
        }
    }
}
