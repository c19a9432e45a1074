//! ARL's JavaScript runtime: the Boa engine as a wasm32-wasip1 reactor that follows ARL's turn
//! contract (`turn`, `host_alloc`, the `host::call` door), so that a session keeps its globals
//! between turns as Node's REPL does.
//!
//! - `wizer.initialize` builds the engine and runs the prelude (`prelude.js`: console,
//!   `util.inspect`, timers, `process`, `require('fs')`); the manager snapshots the result, so
//!   a session starts from an engine already built.
//! - Each turn's input is one JSON [`Turn`]. A cell runs as a script of the realm's global
//!   scope (top-level `let`, `const`, `class` and `function` stay), then its event loop runs
//!   until no job or timer is left; a cell with top-level `await` comes from the host already
//!   rewritten into an async function (`arl_runtimes::javascript`).
//! - The turn reports one JSON frame through the door: the value as `util.inspect` shows it, or
//!   the uncaught error's name, message and stack, or an exit status.
//!
//! Contexts (E2B's) are realms of their own: globals apart, the engine shared.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write;
use std::rc::Rc;

use boa_engine::builtins::promise::{OperationType, Promise, PromiseState};
use boa_engine::context::HostHooks;
use boa_engine::native_function::NativeFunctionPointer;
use boa_engine::object::builtins::{JsArray, JsFunction, JsPromise, JsUint8Array};
use boa_engine::object::{JsObject, ObjectInitializer};
use boa_engine::realm::Realm;
use boa_engine::{
    Context, JsError, JsNativeError, JsResult, JsString, JsValue, NativeFunction, Source, js_string,
};
use serde::Deserialize;

const PRELUDE: &str = include_str!("prelude.js");

#[link(wasm_import_module = "host")]
unsafe extern "C" {
    #[link_name = "call"]
    fn host_call(ptr: *const u8, len: usize, out_ptr: *mut *mut u8, out_len: *mut usize) -> i32;
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    #[link_name = "random_get"]
    fn random_get(buf: *mut u8, len: usize) -> u16;
}

/// One turn's input.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Turn {
    /// A new session's environment.
    Start { env: Vec<(String, String)> },
    /// The user's cell.
    Run {
        code: String,
        /// The cell's number, for stack frames (`REPL3:1:5`).
        n: u64,
        /// Bytes kept of the result and of each error field.
        cap: usize,
        #[serde(default)]
        reseed: bool,
        /// Declarations that a rewritten top-level-`await` cell makes global, each run first
        /// on its own ("already declared" is no error).
        #[serde(default)]
        declare: Vec<String>,
        /// The host could not read the cell (TypeScript): reported as a `SyntaxError`.
        #[serde(default)]
        syntax_error: Option<String>,
        /// The cell is an async function whose promise is the cell's value.
        #[serde(default, rename = "async")]
        is_async: bool,
        #[serde(default)]
        context: Option<ContextRef>,
    },
}

#[derive(Deserialize)]
struct ContextRef {
    id: String,
    cwd: String,
}

/// A namespace: a realm and the prelude's hooks in it.
struct Space {
    realm: Realm,
    hooks: JsObject,
}

struct State {
    context: Context,
    main: Space,
    contexts: HashMap<String, Space>,
    env: Vec<(String, String)>,
    tracker: Rc<Tracker>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    static EXIT: Cell<Option<i32>> = const { Cell::new(None) };
    /// A namespace to start over once the turn has run (`Some(None)`: the session's own).
    static FORGET: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
    static RNG: Cell<[u64; 2]> = const { Cell::new([0x9e37_79b9_7f4a_7c15, 0xbf58_476d_1ce4_e5b9]) };
}

/// Promises rejected with no handler yet: what is left at the end of a turn is reported.
#[derive(Default)]
struct Tracker {
    unhandled: RefCell<Vec<JsObject<Promise>>>,
}

struct Hooks(Rc<Tracker>);

impl HostHooks for Hooks {
    fn promise_rejection_tracker(
        &self,
        promise: &JsObject<Promise>,
        operation: OperationType,
        _: &mut Context,
    ) {
        let mut unhandled = self.0.unhandled.borrow_mut();
        match operation {
            OperationType::Reject => unhandled.push(promise.clone()),
            OperationType::Handle => unhandled.retain(|p| !JsObject::equals(p, promise)),
        }
    }
}

fn reseed() {
    let mut seed = [0u8; 16];
    // SAFETY: WASI writes `seed.len()` bytes into `seed`.
    let failed = unsafe { random_get(seed.as_mut_ptr(), seed.len()) } != 0;
    if failed {
        return;
    }
    let a = u64::from_le_bytes(seed[..8].try_into().unwrap_or_default());
    let b = u64::from_le_bytes(seed[8..].try_into().unwrap_or_default());
    RNG.set([a | 1, b]);
}

/// xorshift128+, reseeded per session and per fork: a snapshot must not replay its draws.
fn random() -> f64 {
    let [mut s1, s0] = RNG.get();
    let out = s0.wrapping_add(s1);
    s1 ^= s1 << 23;
    s1 ^= s1 >> 17;
    s1 ^= s0 ^ (s0 >> 26);
    RNG.set([s0, s1]);
    (out >> 11) as f64 / (1u64 << 53) as f64
}

fn text(value: &JsValue, context: &mut Context) -> JsResult<String> {
    Ok(value.to_string(context)?.to_std_string_escaped())
}

fn arg(args: &[JsValue], i: usize) -> JsValue {
    args.get(i).cloned().unwrap_or_default()
}

fn native_write(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let fd = arg(args, 0).to_i32(context)?;
    let s = text(&arg(args, 1), context)?;
    let written = if fd == 2 {
        std::io::stderr().write_all(s.as_bytes())
    } else {
        let mut out = std::io::stdout();
        out.write_all(s.as_bytes()).and_then(|()| out.flush())
    };
    written.map_err(|e| JsNativeError::error().with_message(e.to_string()))?;
    Ok(JsValue::undefined())
}

fn native_now(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    thread_local! {
        static ORIGIN: std::time::Instant = std::time::Instant::now();
    }
    Ok(ORIGIN.with(|o| o.elapsed().as_secs_f64() * 1000.0).into())
}

fn native_random(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    Ok(random().into())
}

fn native_memory(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    Ok((core::arch::wasm32::memory_size(0) as f64 * 65536.0).into())
}

fn native_exit(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let code = arg(args, 0).to_i32(context)?;
    EXIT.set(Some(code));
    Err(JsNativeError::error()
        .with_message(format!("process.exit({code})"))
        .into())
}

fn native_promise_state(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let pending = || vec![JsValue::from(js_string!("pending")), JsValue::undefined()];
    let pair = match arg(args, 0).as_object().map(JsPromise::from_object) {
        Some(Ok(p)) => match p.state() {
            PromiseState::Pending => pending(),
            PromiseState::Fulfilled(v) => vec![js_string!("fulfilled").into(), v],
            PromiseState::Rejected(v) => vec![js_string!("rejected").into(), v],
        },
        _ => pending(),
    };
    Ok(JsArray::from_iter(pair, context).into())
}

/// `native.fs(op, absolutePath, ...)`: `[code, value]` where `code` is a Node error code
/// (`"ENOENT"`) and `value` its text, or `code` is `null` and `value` the answer. `exists` and
/// `isdir` answer a boolean alone.
fn native_fs(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    use std::fs;
    let op = text(&arg(args, 0), context)?;
    let path = text(&arg(args, 1), context)?;
    match op.as_str() {
        "exists" => return Ok(fs::metadata(&path).is_ok().into()),
        "isdir" => return Ok(fs::metadata(&path).is_ok_and(|m| m.is_dir()).into()),
        _ => {}
    }
    let data = |context: &mut Context| -> JsResult<Vec<u8>> {
        let v = arg(args, 2);
        match v.as_object().map(|o| JsUint8Array::from_object(o.clone())) {
            Some(Ok(bytes)) => Ok(bytes.iter(context).collect()),
            _ => Ok(text(&v, context)?.into_bytes()),
        }
    };
    let done = |r: std::io::Result<JsValue>, context: &mut Context| -> JsResult<JsValue> {
        let pair = match r {
            Ok(v) => vec![JsValue::null(), v],
            Err(e) => {
                let (code, what) = match e.kind() {
                    std::io::ErrorKind::NotFound => ("ENOENT", "no such file or directory"),
                    std::io::ErrorKind::AlreadyExists => ("EEXIST", "file already exists"),
                    std::io::ErrorKind::PermissionDenied => ("EACCES", "permission denied"),
                    std::io::ErrorKind::IsADirectory => {
                        ("EISDIR", "illegal operation on a directory")
                    }
                    std::io::ErrorKind::NotADirectory => ("ENOTDIR", "not a directory"),
                    std::io::ErrorKind::DirectoryNotEmpty => ("ENOTEMPTY", "directory not empty"),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                        ("ENOSPC", "no space left on device")
                    }
                    _ => ("EIO", "i/o error"),
                };
                vec![js_string!(code).into(), js_string!(what).into()]
            }
        };
        Ok(JsArray::from_iter(pair, context).into())
    };
    let unit = |r: std::io::Result<()>| r.map(|()| JsValue::undefined());
    let result = match op.as_str() {
        "read" => match fs::read(&path) {
            Ok(bytes) => Ok(JsUint8Array::from_iter(bytes, context)?.into()),
            Err(e) => Err(e),
        },
        "readText" => fs::read(&path)
            .map(|b| JsValue::from(JsString::from(String::from_utf8_lossy(&b).as_ref()))),
        "write" => {
            let bytes = data(context)?;
            unit(fs::write(&path, bytes))
        }
        "append" => {
            let bytes = data(context)?;
            unit(
                fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(&bytes)),
            )
        }
        "readdir" => fs::read_dir(&path).and_then(|entries| {
            let mut names = Vec::new();
            for entry in entries {
                names.push(entry?.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            let names = names
                .into_iter()
                .map(|n| JsValue::from(JsString::from(n.as_str())));
            Ok(JsArray::from_iter(names, context).into())
        }),
        "mkdir" => unit(fs::create_dir(&path)),
        "mkdirp" => unit(fs::create_dir_all(&path)),
        "unlink" => unit(fs::remove_file(&path)),
        "rmdir" => unit(fs::remove_dir(&path)),
        "rmrf" => unit(match fs::metadata(&path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        }),
        "rename" => {
            let to = text(&arg(args, 2), context)?;
            unit(fs::rename(&path, to))
        }
        "stat" => fs::metadata(&path).map(|m| {
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
            let kind = if m.is_dir() { "dir" } else { "file" };
            let fields = [
                JsValue::from(m.len() as f64),
                modified.into(),
                js_string!(kind).into(),
            ];
            JsArray::from_iter(fields, context).into()
        }),
        other => {
            return Err(JsNativeError::typ()
                .with_message(format!("unknown fs operation {other}"))
                .into());
        }
    };
    done(result, context)
}

/// `__arl_forget(id)`: the namespace `id` (`null`: the session's own) starts over after the turn.
fn native_forget(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let id = arg(args, 0);
    let which = if id.is_null_or_undefined() {
        None
    } else {
        Some(text(&id, context)?)
    };
    FORGET.set(Some(which));
    Ok(JsValue::undefined())
}

/// The host door: sends `frame` (a JSON request) and returns the host's answer as a string.
fn native_call(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let frame = text(&arg(args, 0), context)?;
    let answer = door(frame.as_bytes()).unwrap_or_default();
    Ok(JsString::from(String::from_utf8_lossy(&answer).as_ref()).into())
}

fn door(frame: &[u8]) -> Option<Vec<u8>> {
    let (mut out_ptr, mut out_len) = (core::ptr::null_mut(), 0usize);
    // SAFETY: the host reads `frame` and writes the two out-parameters; an answer it gives is
    // a buffer from our `host_alloc` of `out_len` bytes, which we take back here.
    unsafe {
        host_call(frame.as_ptr(), frame.len(), &mut out_ptr, &mut out_len);
        if out_ptr.is_null() {
            return None;
        }
        Some(Vec::from_raw_parts(out_ptr, out_len, out_len.max(1)))
    }
}

/// The prelude's `native` object: name, function, arity.
const NATIVES: &[(&str, NativeFunctionPointer, usize)] = &[
    ("write", native_write, 2),
    ("now", native_now, 0),
    ("memory", native_memory, 0),
    ("exit", native_exit, 1),
    ("fs", native_fs, 3),
    ("call", native_call, 1),
    ("promiseState", native_promise_state, 1),
];

/// Builds a realm's `native` object and runs the prelude in the context's current realm.
fn install_prelude(context: &mut Context) -> JsResult<JsObject> {
    let mut native = ObjectInitializer::new(context);
    for (name, function, length) in NATIVES {
        native.function(
            NativeFunction::from_fn_ptr(*function),
            JsString::from(*name),
            *length,
        );
    }
    let native = native.build();
    // Math.random from a generator each session reseeds.
    let math = context
        .global_object()
        .get(js_string!("Math"), context)?
        .as_object()
        .ok_or_else(|| JsNativeError::typ().with_message("no Math"))?;
    math.set(
        js_string!("random"),
        NativeFunction::from_fn_ptr(native_random).to_js_function(context.realm()),
        false,
        context,
    )?;
    let global = context.global_object();
    global.set(
        js_string!("__arl_forget"),
        NativeFunction::from_fn_ptr(native_forget).to_js_function(context.realm()),
        false,
        context,
    )?;
    let prelude = context.eval(Source::from_bytes(PRELUDE))?;
    let prelude = prelude
        .as_callable()
        .ok_or_else(|| JsNativeError::typ().with_message("the prelude is not a function"))?;
    let hooks = prelude.call(&JsValue::undefined(), &[native.into()], context)?;
    hooks.as_object().ok_or_else(|| {
        JsNativeError::typ()
            .with_message("the prelude returned no hooks")
            .into()
    })
}

fn new_space(context: &mut Context, env: &[(String, String)]) -> JsResult<Space> {
    let realm = context.create_realm()?;
    let old = context.enter_realm(realm.clone());
    let hooks = install_prelude(context).and_then(|hooks| {
        call_hook(&hooks, "setEnv", &[env_array(env, context)], context)?;
        Ok(hooks)
    });
    context.enter_realm(old);
    Ok(Space {
        realm,
        hooks: hooks?,
    })
}

fn env_array(env: &[(String, String)], context: &mut Context) -> JsValue {
    let pairs: Vec<JsValue> = env
        .iter()
        .map(|(k, v)| {
            let pair = [
                JsValue::from(JsString::from(k.as_str())),
                JsValue::from(JsString::from(v.as_str())),
            ];
            JsArray::from_iter(pair, context).into()
        })
        .collect();
    JsArray::from_iter(pairs, context).into()
}

fn call_hook(
    hooks: &JsObject,
    name: &str,
    args: &[JsValue],
    context: &mut Context,
) -> JsResult<JsValue> {
    let f = hooks.get(JsString::from(name), context)?;
    let f = f
        .as_object()
        .and_then(|o| JsFunction::from_object(o.clone()))
        .ok_or_else(|| JsNativeError::typ().with_message(format!("no hook {name}")))?;
    f.call(&JsValue::undefined(), args, context)
}

#[unsafe(export_name = "wizer.initialize")]
pub extern "C" fn initialize() {
    let tracker = Rc::new(Tracker::default());
    let Ok(mut context) = Context::builder()
        .host_hooks(Rc::new(Hooks(tracker.clone())))
        .build()
    else {
        return;
    };
    let Ok(main) = new_space(&mut context, &[]) else {
        return;
    };
    context.enter_realm(main.realm.clone());
    STATE.set(Some(State {
        context,
        main,
        contexts: HashMap::new(),
        env: Vec::new(),
        tracker,
    }));
}

#[unsafe(no_mangle)]
pub extern "C" fn host_alloc(len: usize) -> *mut u8 {
    let mut buf = Vec::<u8>::with_capacity(len.max(1));
    let ptr = buf.as_mut_ptr();
    core::mem::forget(buf);
    ptr
}

#[unsafe(no_mangle)]
#[allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "the contract's export: the host passes a buffer from `host_alloc`"
)]
pub extern "C" fn turn(ptr: *mut u8, len: usize) -> i32 {
    let input = if ptr.is_null() {
        Vec::new()
    } else {
        // SAFETY: the host filled `len` bytes of a buffer from `host_alloc(len)`, given once.
        unsafe { Vec::from_raw_parts(ptr, len, len.max(1)) }
    };
    let turn: Turn = match serde_json::from_slice(&input) {
        Ok(t) => t,
        Err(e) => {
            report(&Frame::error(
                "TurnError",
                &format!("bad turn input: {e}"),
                "",
                usize::MAX,
            ));
            return 0;
        }
    };
    drop(input);
    STATE.with_borrow_mut(|state| match state {
        Some(state) => state.turn(turn),
        None => report(&Frame::error(
            "TurnError",
            "the engine is not initialised",
            "",
            usize::MAX,
        )),
    });
    0
}

#[derive(serde::Serialize, Default)]
struct Frame {
    result: Option<String>,
    error: Option<ErrorFrame>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit: Option<i64>,
    clipped: bool,
    results: Vec<serde_json::Value>,
}

#[derive(serde::Serialize)]
struct ErrorFrame {
    #[serde(rename = "type")]
    kind: String,
    message: String,
    traceback: String,
}

fn clip(s: &str, cap: usize) -> (String, bool) {
    if s.len() <= cap {
        return (s.to_owned(), false);
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (s[..end].to_owned(), true)
}

impl Frame {
    fn error(kind: &str, message: &str, traceback: &str, cap: usize) -> Frame {
        let mut frame = Frame::default();
        frame.set_error(kind, message, traceback, cap);
        frame
    }

    fn set_error(&mut self, kind: &str, message: &str, traceback: &str, cap: usize) {
        let (kind, a) = clip(kind, cap);
        let (message, b) = clip(message, cap);
        let (traceback, c) = clip(traceback, cap);
        self.clipped |= a || b || c;
        self.error = Some(ErrorFrame {
            kind,
            message,
            traceback,
        });
    }
}

fn report(frame: &Frame) {
    if let Ok(bytes) = serde_json::to_vec(frame) {
        door(&bytes);
    }
}

impl State {
    fn turn(&mut self, turn: Turn) {
        match turn {
            Turn::Start { env } => {
                reseed();
                // WASI's first descriptor call sets up the session's view of its preopens:
                // done here, it is part of the session's starting state, not a file the cells
                // seem to hold open (which would refuse forks and snapshots).
                let _ = std::fs::metadata("/workspace");
                let context = &mut self.context;
                let pairs = env_array(&env, context);
                let done = call_hook(&self.main.hooks, "setEnv", &[pairs], context);
                self.env = env;
                let mut frame = Frame::default();
                if let Err(e) = done {
                    frame.set_error("TurnError", &e.to_string(), "", usize::MAX);
                }
                report(&frame);
            }
            Turn::Run {
                code,
                n,
                cap,
                reseed: fresh,
                declare,
                syntax_error,
                is_async,
                context,
            } => {
                if fresh {
                    reseed();
                }
                if let Some(message) = syntax_error {
                    let stack = format!("SyntaxError: {message}");
                    report(&Frame::error("SyntaxError", &message, &stack, cap));
                    return;
                }
                let mut frame = self.run(&code, n, cap, &declare, is_async, context);
                if let Some(which) = FORGET.take()
                    && let Err(e) = self.forget(which)
                {
                    frame.set_error("TurnError", &e.to_string(), "", cap);
                }
                report(&frame);
            }
        }
    }

    /// Starts a namespace over: a new realm with the prelude, the old one dropped.
    fn forget(&mut self, which: Option<String>) -> JsResult<()> {
        let space = new_space(&mut self.context, &self.env)?;
        match which {
            Some(id) => {
                self.contexts.insert(id, space);
            }
            None => self.main = space,
        }
        self.context.enter_realm(self.main.realm.clone());
        Ok(())
    }

    fn space(&mut self, context: Option<&ContextRef>) -> JsResult<(Realm, JsObject)> {
        let Some(c) = context else {
            return Ok((self.main.realm.clone(), self.main.hooks.clone()));
        };
        if !self.contexts.contains_key(&c.id) {
            let space = new_space(&mut self.context, &self.env)?;
            self.contexts.insert(c.id.clone(), space);
        }
        let space = &self.contexts[&c.id];
        let cwd = JsValue::from(JsString::from(c.cwd.as_str()));
        call_hook(&space.hooks, "setCwd", &[cwd], &mut self.context)?;
        Ok((space.realm.clone(), space.hooks.clone()))
    }

    fn run(
        &mut self,
        code: &str,
        n: u64,
        cap: usize,
        declare: &[String],
        is_async: bool,
        context: Option<ContextRef>,
    ) -> Frame {
        EXIT.set(None);
        self.tracker.unhandled.borrow_mut().clear();
        let (realm, hooks) = match self.space(context.as_ref()) {
            Ok(space) => space,
            Err(e) => return Frame::error("TurnError", &e.to_string(), "", cap),
        };
        self.context.enter_realm(realm);
        let mut frame = Frame::default();
        let outcome = self.evaluate(code, n, declare, is_async, &hooks);
        let ctx = &mut self.context;
        match outcome {
            Ok(value) => {
                if !value.is_undefined() {
                    match call_hook(&hooks, "inspect", &[value], ctx).and_then(|s| text(&s, ctx)) {
                        Ok(shown) => {
                            let (shown, cut) = clip(&shown, cap);
                            frame.clipped |= cut;
                            frame.results.push(serde_json::json!({
                                "text/plain": shown, "is_main_result": true,
                            }));
                            frame.result = Some(shown);
                        }
                        Err(e) => self.describe(&mut frame, e, &hooks, cap),
                    }
                }
            }
            Err(e) => self.describe(&mut frame, e, &hooks, cap),
        }
        if frame.error.is_none() {
            let left = self.tracker.unhandled.borrow_mut().drain(..).next();
            if let Some(promise) = left
                && let PromiseState::Rejected(reason) = JsPromise::from(promise).state()
            {
                self.describe(&mut frame, JsError::from_opaque(reason), &hooks, cap);
                frame.result = None;
                frame.results.clear();
                if let Some(e) = frame.error.as_mut() {
                    e.traceback = format!("Uncaught (in promise) {}", e.traceback);
                }
            }
        }
        if let Some(code) = EXIT.take() {
            frame.error = None;
            frame.exit = Some(i64::from(code));
        }
        let ctx = &mut self.context;
        let _ = call_hook(&hooks, "clearTimers", &[], ctx);
        self.context.enter_realm(self.main.realm.clone());
        frame
    }

    /// Runs the cell and its event loop; the cell's value (an async cell's settled value).
    fn evaluate(
        &mut self,
        code: &str,
        n: u64,
        declare: &[String],
        is_async: bool,
        hooks: &JsObject,
    ) -> JsResult<JsValue> {
        let ctx = &mut self.context;
        let name = format!("REPL{n}");
        for script in declare {
            // `let x;` for a global `x` an earlier cell declared: it is already there.
            let _ = ctx.eval(Source::from_bytes(script).with_path(std::path::Path::new(&name)));
        }
        let value = ctx.eval(Source::from_bytes(code).with_path(std::path::Path::new(&name)))?;
        let awaited = if is_async {
            value
                .as_object()
                .and_then(|o| JsPromise::from_object(o).ok())
        } else {
            None
        };
        loop {
            ctx.run_jobs()?;
            if EXIT.get().is_some() {
                break;
            }
            let next = call_hook(hooks, "nextTimer", &[], ctx)?.to_number(ctx)?;
            if next < 0.0 {
                break;
            }
            if next > 0.0 {
                std::thread::sleep(std::time::Duration::from_secs_f64(next / 1000.0));
            }
            call_hook(hooks, "fireTimer", &[], ctx)?;
        }
        match awaited {
            Some(p) => match p.state() {
                PromiseState::Fulfilled(v) => Ok(v),
                PromiseState::Rejected(reason) => {
                    self.tracker.unhandled.borrow_mut().retain(|q| {
                        !JsObject::equals(&q.clone().upcast(), &JsObject::from(p.clone()))
                    });
                    Err(JsError::from_opaque(reason))
                }
                PromiseState::Pending => Ok(JsValue::undefined()),
            },
            None => Ok(value),
        }
    }

    fn describe(&mut self, frame: &mut Frame, error: JsError, hooks: &JsObject, cap: usize) {
        let ctx = &mut self.context;
        let value = match error.into_opaque(ctx) {
            Ok(v) => v,
            Err(e) => {
                // Engine errors (a runaway recursion...) have no JS value.
                let text = e.to_string();
                let message = text.lines().next().unwrap_or_default();
                let message = message
                    .strip_prefix("RuntimeLimitError: ")
                    .unwrap_or(message);
                frame.set_error("RangeError", message, &format!("RangeError: {text}"), cap);
                return;
            }
        };
        let described = call_hook(hooks, "describe", &[value], ctx).and_then(|v| {
            let o = v
                .as_object()
                .ok_or_else(|| JsNativeError::typ().with_message("describe"))?;
            let field =
                |i: u32, ctx: &mut Context| -> JsResult<String> { text(&o.get(i, ctx)?, ctx) };
            Ok((field(0, ctx)?, field(1, ctx)?, field(2, ctx)?))
        });
        match described {
            Ok((kind, message, stack)) => frame.set_error(&kind, &message, &stack, cap),
            Err(e) => frame.set_error("Error", &e.to_string(), "", cap),
        }
    }
}
