//! The Task controller: runs a Task's steps in order in its Sandbox's session, through the
//! session API of the manager holding it (as the gateway routes), stops at the first step
//! that fails, retries from the first step as asked, and deletes finished Tasks after their
//! TTL.
//!
//! Steps by sandbox: `FilePatch` everywhere (a container pod's agent applies a diff all or
//! nothing; on a WASM session the controller applies it and writes each file), `Command` on
//! container sandboxes, `Code` (Python) on WASM sandboxes and, as `python3 -c`, in containers.
//! A Task found `Running` (the operator restarted mid-run) is run again as a new attempt.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use serde_json::{Value, json};

use crate::crd::{
    Sandbox, SandboxPhase, StepResult, StepType, Task, TaskState, TaskStatus, TaskStep, WarmPool,
};
use crate::manager::Endpoint;
use crate::pool::condition;
use crate::{Context, Error, Result};

/// A Task's deadline when it names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Output kept per step in the status: its last bytes.
pub const TAIL_BYTES: usize = 4096;

/// Runs the controller until the stream ends.
pub async fn run(ctx: Arc<Context>, tasks: Api<Task>) {
    Controller::new(tasks, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "task reconcile failed");
            }
        })
        .await;
}

pub fn error_policy(_task: Arc<Task>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "task");
    Action::requeue(Duration::from_secs(5))
}

/// Runs a Pending (or interrupted) Task to its end, or deletes a finished one past its TTL.
#[tracing::instrument(skip_all, fields(task = %task.name_any(), trace = task.spec.trace_id.as_deref().unwrap_or("")))]
pub async fn reconcile(task: Arc<Task>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = task
        .namespace()
        .ok_or_else(|| Error::NoNamespace(task.name_any()))?;
    let tasks: Api<Task> = Api::namespaced(ctx.client.clone(), &namespace);
    let status = task.status.clone().unwrap_or_default();
    if matches!(status.state, TaskState::Succeeded | TaskState::Failed) {
        return expire(&task, &status, &tasks).await;
    }
    let Some(timeout) = task
        .spec
        .timeout
        .as_deref()
        .map_or(Some(DEFAULT_TIMEOUT), parse_duration)
    else {
        let message = format!(
            "timeout {:?} is not a duration such as 90s or 5m",
            task.spec.timeout
        );
        return finish(&task, &tasks, status, TaskState::Failed, message).await;
    };
    let sandboxes: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &namespace);
    let sandbox_ref = &task.spec.sandbox_ref;
    let Some(sandbox) = sandboxes.get_opt(sandbox_ref).await? else {
        let message = format!("Sandbox {sandbox_ref} does not exist in {namespace}");
        write(&task, &tasks, pending(&status, message)).await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    let placed = sandbox.status.clone().unwrap_or_default();
    match placed.phase {
        SandboxPhase::Ready => {}
        SandboxPhase::Pending => {
            let message = format!("Sandbox {sandbox_ref} is not Ready yet");
            write(&task, &tasks, pending(&status, message)).await?;
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        phase => {
            let message = format!(
                "Sandbox {sandbox_ref} is {phase:?}: {}",
                placed.message.unwrap_or_default()
            );
            return finish(&task, &tasks, status, TaskState::Failed, message).await;
        }
    }
    let (Some(pod), Some(session)) = (placed.pod_name, placed.session_id) else {
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    let Some(member) = ctx.fleet.pod(&namespace, &pod) else {
        let message = format!("pod {pod} of Sandbox {sandbox_ref} is not known yet");
        write(&task, &tasks, pending(&status, message)).await?;
        return Ok(Action::requeue(ctx.interval));
    };
    let pools: Api<WarmPool> = Api::namespaced(ctx.client.clone(), &namespace);
    let container = pools
        .get_opt(&sandbox.spec.pool_ref)
        .await?
        .is_some_and(|p| p.spec.runtime.container.is_some());
    if let Some(step) = task
        .spec
        .steps
        .iter()
        .find(|s| s.type_ == StepType::Command && !container)
    {
        let message = format!(
            "step {:?} is a Command: Sandbox {sandbox_ref} is a WebAssembly session, which runs \
             Code and FilePatch steps; Commands need a container pool",
            step.name
        );
        return finish(&task, &tasks, status, TaskState::Failed, message).await;
    }
    let session = Session {
        ctx: &ctx,
        at: member.endpoint,
        id: session,
        container,
    };
    let mut status = status;
    loop {
        status.attempts += 1;
        status.state = TaskState::Running;
        status.start_time = Some(crate::rfc3339(SystemTime::now()));
        status.steps.clear();
        status.message = Some(format!(
            "attempt {} of {}",
            status.attempts,
            task.spec.retries + 1
        ));
        write(&task, &tasks, status.clone()).await?;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut failed = None;
        for step in &task.spec.steps {
            let began = Instant::now();
            let mut result = match deadline.checked_duration_since(began) {
                Some(left) if !left.is_zero() => session.run(step, left).await,
                _ => StepResult {
                    exit_code: 124,
                    stderr: format!(
                        "the Task's timeout ({}) passed before this step",
                        fmt(timeout)
                    ),
                    ..StepResult::default()
                },
            };
            result.name = step.name.clone();
            result.duration_ms = began.elapsed().as_millis() as u64;
            tracing::info!(step = %step.name, exit_code = result.exit_code, ms = result.duration_ms, "step");
            let code = result.exit_code;
            status.steps.push(result);
            if code != 0 {
                failed = Some(step.name.clone());
                break;
            }
        }
        let last = status.steps.last().cloned().unwrap_or_default();
        status.exit_code = Some(last.exit_code);
        status.stdout = Some(last.stdout);
        status.stderr = Some(last.stderr);
        status.duration = Some(fmt(started.elapsed()));
        match failed {
            None => {
                let message = format!("{} step(s) succeeded", status.steps.len());
                return finish(&task, &tasks, status, TaskState::Succeeded, message).await;
            }
            Some(step) if status.attempts > task.spec.retries => {
                let message = format!("step {step:?} failed with exit code {}", last.exit_code);
                return finish(&task, &tasks, status, TaskState::Failed, message).await;
            }
            Some(step) => tracing::info!(%step, attempt = status.attempts, "step failed; retrying"),
        }
    }
}

/// A Sandbox's session, and how to reach it.
struct Session<'a> {
    ctx: &'a Context,
    at: Endpoint,
    id: String,
    container: bool,
}

impl Session<'_> {
    /// Runs one step within `left`; how it went (a refusal is a failed step, not an error).
    async fn run(&self, step: &TaskStep, left: Duration) -> StepResult {
        let outcome = match step.type_ {
            StepType::FilePatch if self.container => self.agent_files(step, left).await,
            StepType::FilePatch => self.wasm_files(step, left).await,
            StepType::Command => {
                let body = json!({
                    "command": step.command.clone().unwrap_or_default(),
                    "cwd": step.work_dir.clone().unwrap_or_default(),
                    "env": step.env.clone().unwrap_or_default(),
                    "timeout_ms": left.as_millis() as u64,
                });
                self.command(&body, left).await
            }
            StepType::Code if self.container => {
                let code = step.code.clone().unwrap_or_default();
                let body = json!({"command": ["python3", "-c", code], "timeout_ms": left.as_millis() as u64});
                self.command(&body, left).await
            }
            StepType::Code => {
                self.cell(step.code.as_deref().unwrap_or_default(), left)
                    .await
            }
        };
        outcome.unwrap_or_else(|e| StepResult {
            exit_code: 1,
            stderr: tail(&e.to_string()),
            ..StepResult::default()
        })
    }

    fn path(&self, route: &str) -> String {
        format!("/v1/sessions/{}/{route}", self.id)
    }

    /// Slack over a step's own deadline for the HTTP call that carries it.
    fn budget(left: Duration) -> Duration {
        left + Duration::from_secs(5)
    }

    /// POSTs `body` to the session's `route`: the answer, or the refusal as a failed step.
    async fn post(
        &self,
        route: &str,
        body: &Value,
        left: Duration,
    ) -> Result<Result<Value, StepResult>> {
        let (status, answer) = self
            .ctx
            .managers
            .call(
                &self.at,
                reqwest::Method::POST,
                &self.path(route),
                Some(body),
                Self::budget(left),
            )
            .await?;
        Ok(if status == 200 {
            Ok(answer)
        } else {
            Err(refused(status, &answer))
        })
    }

    async fn command(&self, body: &Value, left: Duration) -> Result<StepResult> {
        let answer = match self.post("commands", body, left).await? {
            Ok(answer) => answer,
            Err(failed) => return Ok(failed),
        };
        Ok(StepResult {
            exit_code: answer["exit_code"].as_i64().map_or(1, |c| c as i32),
            stdout: tail(answer["stdout"].as_str().unwrap_or_default()),
            stderr: tail(answer["stderr"].as_str().unwrap_or_default()),
            ..StepResult::default()
        })
    }

    async fn cell(&self, code: &str, left: Duration) -> Result<StepResult> {
        let body = json!({"code": code, "timeout_ms": left.as_millis() as u64});
        let answer = match self.post("execute", &body, left).await? {
            Ok(answer) => answer,
            Err(failed) => return Ok(failed),
        };
        let mut stderr = answer["stderr"].as_str().unwrap_or_default().to_owned();
        let error = &answer["error"];
        let failed = !error.is_null() || answer["rolled_back"].as_bool() == Some(true);
        if !error.is_null() {
            stderr.push_str(&format!(
                "{}: {}\n",
                error["type"].as_str().unwrap_or("Error"),
                error["message"].as_str().unwrap_or_default()
            ));
        } else if let Some(why) = answer["rollback_reason"].as_str() {
            stderr.push_str(&format!("rolled back: {why}\n"));
        }
        Ok(StepResult {
            exit_code: i32::from(failed),
            stdout: tail(answer["stdout"].as_str().unwrap_or_default()),
            stderr: tail(&stderr),
            ..StepResult::default()
        })
    }

    /// A container pod's agent writes the files and applies the diff, all or nothing.
    async fn agent_files(&self, step: &TaskStep, left: Duration) -> Result<StepResult> {
        let mut body = json!({"patch": step.patch.clone().unwrap_or_default()});
        if let (Some(path), Some(content)) = (&step.path, &step.content) {
            body["files"] = json!({ path: content });
        }
        let answer = match self.post("files", &body, left).await? {
            Ok(answer) => answer,
            Err(failed) => return Ok(failed),
        };
        Ok(StepResult {
            stdout: tail(answer["message"].as_str().unwrap_or_default()),
            ..StepResult::default()
        })
    }

    /// A WASM session's files: every file's new content worked out first, then written.
    async fn wasm_files(&self, step: &TaskStep, left: Duration) -> Result<StepResult> {
        let managers = &self.ctx.managers;
        let mut writes: Vec<(String, Option<String>)> = Vec::new();
        if let (Some(path), Some(content)) = (&step.path, &step.content) {
            writes.push((path.clone(), Some(content.clone())));
        }
        if let Some(patch) = step.patch.as_deref().filter(|p| !p.trim().is_empty()) {
            let files = match arl_exec::patch::parse(patch) {
                Ok(files) => files,
                Err(e) => return Ok(failed_step(&e.message)),
            };
            for file in files {
                let original = match writes.iter().find(|(p, _)| p == file.path()) {
                    Some((_, Some(written))) => Some(written.clone()),
                    Some((_, None)) => None,
                    None => {
                        managers
                            .read_file(&self.at, &self.id, file.path(), left)
                            .await?
                    }
                };
                let original = match original {
                    Some(text) => text,
                    None if file.creates() => String::new(),
                    None => {
                        return Ok(failed_step(&format!(
                            "the patch changes `{}`, which does not exist",
                            file.path()
                        )));
                    }
                };
                match file.apply(&original) {
                    Ok(after) => writes.push((file.path().to_owned(), after)),
                    Err(e) => return Ok(failed_step(&e.message)),
                }
            }
        }
        for (path, content) in &writes {
            match content {
                Some(content) => {
                    managers
                        .write_file(&self.at, &self.id, path, content.clone(), left)
                        .await?;
                }
                None => {
                    let route = self.path(&format!("files/{path}"));
                    managers
                        .call(&self.at, reqwest::Method::DELETE, &route, None, left)
                        .await?;
                }
            }
        }
        Ok(StepResult {
            stdout: format!("wrote {} file(s)", writes.len()),
            ..StepResult::default()
        })
    }
}

fn failed_step(why: &str) -> StepResult {
    StepResult {
        exit_code: 1,
        stderr: tail(why),
        ..StepResult::default()
    }
}

/// A step the manager refused (4xx/5xx): failed, with its error.
fn refused(status: u16, answer: &Value) -> StepResult {
    let error = &answer["error"];
    failed_step(&format!(
        "{status} {}: {}",
        error["code"].as_str().unwrap_or("error"),
        error["message"].as_str().unwrap_or_default()
    ))
}

/// The last [`TAIL_BYTES`] of `text`, cut at a character boundary.
pub fn tail(text: &str) -> String {
    if text.len() <= TAIL_BYTES {
        return text.to_owned();
    }
    let mut cut = text.len() - TAIL_BYTES;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_owned()
}

/// A Go-style duration: `90s`, `5m`, `1h30m`, `500ms`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = [("ms", 1u64), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))?;
        total += Duration::from_millis(n.checked_mul(len)?);
        rest = &rest[unit.len()..];
    }
    Some(total)
}

fn fmt(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn pending(status: &TaskStatus, message: String) -> TaskStatus {
    TaskStatus {
        state: TaskState::Pending,
        message: Some(message),
        ..status.clone()
    }
}

/// Writes the Task's end, then comes back for its TTL.
async fn finish(
    task: &Task,
    tasks: &Api<Task>,
    mut status: TaskStatus,
    state: TaskState,
    message: String,
) -> Result<Action> {
    status.state = state;
    status.message = Some(message);
    status.completion_time = Some(crate::rfc3339(SystemTime::now()));
    write(task, tasks, status.clone()).await?;
    tracing::info!(?state, "task finished");
    Ok(match task.spec.ttl_seconds_after_finished {
        Some(ttl) => Action::requeue(Duration::from_secs(ttl.max(0) as u64)),
        None => Action::await_change(),
    })
}

/// Deletes a finished Task whose TTL has passed, or comes back when it will have.
async fn expire(task: &Task, status: &TaskStatus, tasks: &Api<Task>) -> Result<Action> {
    let Some(ttl) = task.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let finished = status
        .completion_time
        .as_deref()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map_or(SystemTime::now(), SystemTime::from);
    let due = finished + Duration::from_secs(ttl.max(0) as u64);
    match due.duration_since(SystemTime::now()) {
        Ok(left) if !left.is_zero() => Ok(Action::requeue(left)),
        _ => {
            tasks
                .delete(&task.name_any(), &DeleteParams::background())
                .await?;
            tracing::info!("task deleted after its TTL");
            Ok(Action::await_change())
        }
    }
}

/// Writes `status` with its `Complete` condition and generation, unless nothing changed.
async fn write(task: &Task, tasks: &Api<Task>, mut status: TaskStatus) -> Result<()> {
    let previous = task.status.clone().unwrap_or_default();
    status.observed_generation = task.metadata.generation;
    let done = matches!(status.state, TaskState::Succeeded | TaskState::Failed);
    let reason = format!("{:?}", status.state);
    status.conditions = vec![condition(
        &previous.conditions,
        "Complete",
        (
            if done { "True" } else { "False" },
            &reason,
            status.message.clone().unwrap_or_default(),
        ),
        status.observed_generation,
        SystemTime::now(),
    )];
    if status == previous {
        return Ok(());
    }
    let patch = json!({ "status": status });
    tasks
        .patch_status(
            &task.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_go_writes_them() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "5", "m", "5x", "-1s", "1.5s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_tail_keeps_the_end_whole() {
        let text = format!("{}é{}", "a".repeat(10), "b".repeat(TAIL_BYTES - 1));
        let t = tail(&text);
        assert!(t.len() <= TAIL_BYTES && t.ends_with('b'));
        assert_eq!(tail("short"), "short");
    }
}
