//! Every C symbol fp8xla exports (declared in `include/fp8xla.h`).
//!
//! Handler symbols take XLA's call frame and delegate to the safe bodies in
//! `crate::handlers`; the observer functions read the per-site statistics that
//! `fp8xla_observe` records.
//!
//! The `export_handlers!` table below is the one registry of custom-call targets: each line
//! names a target, which is also its exported symbol. [`TARGETS`] lists them for Rust and
//! `fp8xla_targets()` for everyone else (the Python package registers and allows exactly
//! what it returns). Their contracts are in `docs/custom-calls.md`.
use super::entry::run;
use super::raw::{XLA_FFI_CallFrame, XLA_FFI_Error};
use crate::handlers;
use std::ffi::{c_char, CStr, CString};

/// Exports one XLA FFI handler per line (`symbol => body`, and `in_place (result, operand)`
/// for a target whose result updates an operand in place), and lists the symbols in
/// [`TARGETS`] and [`TARGET_LINES`].
macro_rules! export_handlers {
    ($($symbol:ident => $body:path $(, in_place $pairs:expr)?;)*) => {
        $(
            /// XLA FFI handler (typed FFI, platform `cpu`); contract in `docs/custom-calls.md`.
            ///
            /// # Safety
            /// Called by XLA with a valid call frame.
            #[no_mangle]
            pub unsafe extern "C" fn $symbol(
                frame: *mut XLA_FFI_CallFrame,
            ) -> *mut XLA_FFI_Error {
                // SAFETY: XLA passes the call frame of this invocation.
                unsafe { run(frame, stringify!($symbol), $body, &[$($pairs)?]) }
            }
        )*

        /// Every custom-call target this library exports, in table order. Each name is also
        /// the exported C symbol of its handler.
        pub const TARGETS: &[&str] = &[$(stringify!($symbol)),*];

        /// [`TARGETS`] as one NUL-terminated C string, each name followed by `\n`.
        pub const TARGET_LINES: &str = concat!($(stringify!($symbol), "\n",)* "\0");
    };
}

export_handlers! {
    fp8xla_quantize => handlers::quantize;
    fp8xla_dequantize => handlers::dequantize;
    fp8xla_qdq => handlers::qdq;
    fp8xla_observe => handlers::observe;
    fp8xla_matmul => handlers::matmul;
    fp8xla_dot_f32 => handlers::dot_f32;
    fp8xla_take => handlers::take;
    fp8xla_update_slice => handlers::update_slice, in_place (0, 0);
    fp8xla_quantize_rows => handlers::quantize_rows;
    fp8xla_argmax => handlers::argmax;
}

/// The custom-call targets this library exports, each name followed by a newline, as one
/// static NUL-terminated string (owned by the library: not to be freed or modified).
#[no_mangle]
pub extern "C" fn fp8xla_targets() -> *const c_char {
    TARGET_LINES.as_ptr().cast()
}

/// Number of sites `fp8xla_observe` has recorded since the last reset.
#[no_mangle]
pub extern "C" fn fp8xla_observer_num_sites() -> i64 {
    handlers::observer::snapshot().len() as i64
}

/// Copies up to `capacity` recorded sites, sorted by site id: the id, the largest finite
/// |x| seen, the number of elements seen and how many of them were NaN or infinite. Any of
/// the pointers may be NULL to skip that column. Returns the number of sites written.
///
/// # Safety
/// Each non-NULL pointer must be valid for `capacity` writes of its type.
#[no_mangle]
pub unsafe extern "C" fn fp8xla_observer_read(
    sites: *mut i64,
    amax: *mut f32,
    count: *mut i64,
    nonfinite: *mut i64,
    capacity: i64,
) -> i64 {
    let all = handlers::observer::snapshot();
    let n = all.len().min(usize::try_from(capacity).unwrap_or(0));
    for (i, (site, stat)) in all.iter().take(n).enumerate() {
        // SAFETY: i < capacity and the caller guarantees each non-null pointer has room.
        unsafe {
            if !sites.is_null() {
                *sites.add(i) = *site;
            }
            if !amax.is_null() {
                *amax.add(i) = stat.amax;
            }
            if !count.is_null() {
                *count.add(i) = stat.count as i64;
            }
            if !nonfinite.is_null() {
                *nonfinite.add(i) = stat.nonfinite as i64;
            }
        }
    }
    n as i64
}

/// Forgets every recorded site.
#[no_mangle]
pub extern "C" fn fp8xla_observer_reset() {
    handlers::observer::reset();
}

/// The CPU level the kernels run with: 0 scalar, 1 AVX2, 2 AVX-512, 3 AMX.
#[no_mangle]
pub extern "C" fn fp8xla_isa_level() -> i32 {
    crate::cpu::Isa::detect() as i32
}

/// What the kernels run on this machine and why, as a JSON object (see
/// `kernels::info_json`): one static NUL-terminated string owned by the library.
#[no_mangle]
pub extern "C" fn fp8xla_kernel_info() -> *const c_char {
    static INFO: once_cell::sync::Lazy<CString> = once_cell::sync::Lazy::new(|| {
        CString::new(crate::kernels::info_json()).unwrap_or_default()
    });
    INFO.as_ptr()
}

/// Runs a graph-rewrite pass by name (one of `crate::rewrite::PASSES`) over StableHLO text.
///
/// On success returns 0 and sets `*out_module` (the rewritten module) and `*out_report` (a
/// JSON report); on failure returns 1 (the pass refused: malformed IR, bad options) or 2 (bad
/// arguments to this function, or an internal error) and sets `*out_report` to the message and
/// `*out_module` to NULL. Free both strings with `fp8xla_free_string`.
///
/// # Safety
/// `pass`, `module` and `options` must be NUL-terminated strings; `out_module` and
/// `out_report` must be valid for one pointer write each.
#[no_mangle]
pub unsafe extern "C" fn fp8xla_rewrite(
    pass: *const c_char,
    module: *const c_char,
    options: *const c_char,
    out_module: *mut *mut c_char,
    out_report: *mut *mut c_char,
) -> i32 {
    if out_module.is_null() || out_report.is_null() {
        return 2;
    }
    let read = |p: *const c_char, what: &str| -> Result<String, String> {
        if p.is_null() {
            return Err(format!("fp8xla_rewrite: `{what}` is NULL"));
        }
        // SAFETY: the caller passes NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }
            .to_str()
            .map(str::to_owned)
            .map_err(|_| format!("fp8xla_rewrite: `{what}` is not UTF-8"))
    };
    let outcome = std::panic::catch_unwind(|| -> Result<(String, String), (i32, String)> {
        let pass = read(pass, "pass").map_err(|e| (2, e))?;
        let module = read(module, "module").map_err(|e| (2, e))?;
        let options = read(options, "options").map_err(|e| (2, e))?;
        // An unknown pass name is a bad argument (2); the error lists the known ones.
        let code = if crate::rewrite::PASSES.contains(&pass.as_str()) {
            1
        } else {
            2
        };
        crate::rewrite::run_pass(&pass, &module, &options).map_err(|e| (code, e.to_string()))
    });
    let (code, module, report) = match outcome {
        Ok(Ok((m, r))) => (0, Some(m), r),
        Ok(Err((code, msg))) => (code, None, msg),
        Err(_) => (
            2,
            None,
            "fp8xla_rewrite: internal error (bug in fp8xla)".to_string(),
        ),
    };
    let to_c = |s: String| {
        CString::new(s.replace('\0', " "))
            .unwrap_or_default()
            .into_raw()
    };
    // SAFETY: both out pointers were checked non-null and are valid for one write.
    unsafe {
        *out_module = module.map_or(std::ptr::null_mut(), to_c);
        *out_report = to_c(report);
    }
    code
}

/// Frees a string returned by `fp8xla_rewrite` (NULL is ignored).
///
/// # Safety
/// `s` must be NULL or a string returned by this library and not freed before.
#[no_mangle]
pub unsafe extern "C" fn fp8xla_free_string(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: `s` came from CString::into_raw in this library.
        drop(unsafe { CString::from_raw(s) });
    }
}
