//! Every C symbol fp8xla exports (declared in `include/fp8xla.h`).
//!
//! Handler symbols take XLA's call frame and delegate to the safe bodies in
//! `crate::handlers`; the observer functions read the per-site statistics that
//! `fp8xla_observe` records.
use super::entry::run;
use super::raw::{XLA_FFI_CallFrame, XLA_FFI_Error};
use crate::handlers;

macro_rules! export_handlers {
    ($($symbol:ident => $body:path),* $(,)?) => {$(
        /// XLA FFI handler (typed FFI, platform `cpu`).
        ///
        /// # Safety
        /// Called by XLA with a valid call frame.
        #[no_mangle]
        pub unsafe extern "C" fn $symbol(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
            // SAFETY: XLA passes the call frame of this invocation.
            unsafe { run(frame, stringify!($symbol), $body) }
        }
    )*};
}

export_handlers! {
    fp8xla_quantize => handlers::quantize,
    fp8xla_dequantize => handlers::dequantize,
    fp8xla_qdq => handlers::qdq,
    fp8xla_observe => handlers::observe,
    fp8xla_matmul => handlers::matmul,
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

/// The CPU level the kernels run with: 0 scalar, 1 AVX2, 2 AVX-512.
#[no_mangle]
pub extern "C" fn fp8xla_isa_level() -> i32 {
    crate::cpu::Isa::detect() as i32
}
