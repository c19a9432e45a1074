//! The guest half of ARL's turn contract, for Rust guests: `guest!(handler)` exports
//! `turn` and `host_alloc`, and sends the handler's [`Reply`] through `host::call`.

#[link(wasm_import_module = "host")]
unsafe extern "C" {
    #[link_name = "call"]
    fn host_call(ptr: *const u8, len: usize, out_ptr: *mut *mut u8, out_len: *mut usize) -> i32;
}

/// What a turn reports: a result, an error, or an exit status.
pub enum Reply {
    Result(String),
    Error { kind: String, message: String },
    Exit(i32),
    Nothing,
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Sends the reply's frame through the door.
pub fn report(reply: &Reply) {
    let frame = match reply {
        Reply::Nothing => return,
        Reply::Result(r) => format!("{{\"result\":{}}}", escape(r)),
        Reply::Error { kind, message } => format!(
            "{{\"error\":{{\"type\":{},\"message\":{},\"traceback\":\"\"}}}}",
            escape(kind),
            escape(message)
        ),
        Reply::Exit(code) => format!("{{\"exit\":{code}}}"),
    };
    let (mut out_ptr, mut out_len) = (core::ptr::null_mut(), 0usize);
    // SAFETY: the host reads `frame` and writes the two out-parameters, nothing else.
    unsafe { host_call(frame.as_ptr(), frame.len(), &mut out_ptr, &mut out_len) };
}

/// Allocates `len` bytes the host fills with a turn's input; `turn` takes them back.
pub fn alloc(len: usize) -> *mut u8 {
    let mut buf = Vec::<u8>::with_capacity(len.max(1));
    let ptr = buf.as_mut_ptr();
    core::mem::forget(buf);
    ptr
}

/// Takes back the input the host wrote at `ptr` (from [`alloc`]).
///
/// # Safety
/// `ptr` must come from `alloc(len)` and be passed here once.
pub unsafe fn input(ptr: *mut u8, len: usize) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: by the contract above, `ptr` holds `len` initialised bytes of a `len.max(1)` buffer.
    let bytes = unsafe { Vec::from_raw_parts(ptr, len, len.max(1)) };
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Exports `turn` and `host_alloc` for a guest whose turns are `handler(&str) -> Reply`.
#[macro_export]
macro_rules! guest {
    ($handler:path) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn host_alloc(len: usize) -> *mut u8 {
            $crate::alloc(len)
        }

        #[unsafe(no_mangle)]
        #[allow(clippy::not_unsafe_ptr_arg_deref, reason = "the host passes host_alloc's pointer")]
        pub extern "C" fn turn(ptr: *mut u8, len: usize) -> i32 {
            // SAFETY: the host passes what `host_alloc` gave it, once.
            let input = unsafe { $crate::input(ptr, len) };
            $crate::report(&$handler(&input));
            0
        }
    };
}
