//! AVX-512 kernels: the wide FP8 GEMVs of `wide.rs` on zmm registers. The float32 GEMVs and
//! the GEMM stay AVX2's (same e4m3fn domain: both widen through f16).
//!
//! FP8 codes are widened as in `avx2.rs` (16 codes to f16 bit patterns in 16-bit lanes, then
//! `vcvtph2ps` to 16 float32); depth and column tails use masked loads and stores.
#![allow(clippy::too_many_arguments)]

use super::wide::{self, Lanes16};
use super::{Kernels, Mul};
use crate::cpu::Isa;
use crate::fp8::Format;
use std::arch::x86_64::*;

/// The AVX-512 kernel table, if this CPU has AVX-512 F/BW/VL (and the AVX2 set).
pub(super) fn table() -> Option<&'static Kernels> {
    (Isa::supported() >= Isa::Avx512).then_some(&TABLE)
}

/// Handed out by [`table`] only after the CPU check, so its entries run where the
/// instructions exist.
pub(super) static TABLE: Kernels = Kernels {
    isa: Isa::Avx512,
    gemv_name: "avx512 16-lane FMA",
    gemv_nk,
    kn_rows,
    ..super::avx2::TABLE
};

fn gemv_nk(
    fmt: Format,
    lhs: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    ncols: usize,
    out: &mut [f32],
    os: usize,
    mul: Mul,
) {
    // SAFETY: reachable only through `TABLE`, which `table` hands out on AVX-512 CPUs.
    unsafe { gemv_nk_avx512(fmt, lhs, rows, k, w, ncols, out, os, mul) }
}

fn kn_rows(
    fmt: Format,
    lhs: &[f32],
    ls: usize,
    rows: usize,
    kr: usize,
    w: &[u8],
    ncols: usize,
    acc: &mut [f32],
) {
    // SAFETY: reachable only through `TABLE`, which `table` hands out on AVX-512 CPUs.
    unsafe { kn_rows_avx512(fmt, lhs, ls, rows, kr, w, ncols, acc) }
}

// The generic kernels and `Zmm`'s operations are `#[inline(always)]`: they are compiled
// into these two functions, with AVX-512 enabled.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn gemv_nk_avx512(
    fmt: Format,
    lhs: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    ncols: usize,
    out: &mut [f32],
    os: usize,
    mul: Mul,
) {
    wide::gemv_nk::<Zmm>(fmt, lhs, rows, k, w, ncols, out, os, mul)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn kn_rows_avx512(
    fmt: Format,
    lhs: &[f32],
    ls: usize,
    rows: usize,
    kr: usize,
    w: &[u8],
    ncols: usize,
    acc: &mut [f32],
) {
    wide::kn_rows::<Zmm>(fmt, lhs, ls, rows, kr, w, ncols, acc)
}

/// The first `n <= 16` lanes.
#[inline(always)]
fn mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// [`Lanes16`] on one zmm register.
pub(super) struct Zmm;

// SAFETY: every operation needs AVX-512 F/BW/VL (+F16C/AVX2); the kernels using `Zmm` run
// only inside `#[target_feature]` functions reached on such CPUs.
unsafe impl Lanes16 for Zmm {
    type V = __m512;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32, n: usize) -> __m512 {
        if n == 16 {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(mask(n), p)
        }
    }
    #[inline(always)]
    unsafe fn widen<const E5: bool>(p: *const u8, n: usize) -> __m512 {
        let b = if n == 16 {
            _mm_loadu_si128(p as *const __m128i)
        } else {
            _mm_maskz_loadu_epi8(mask(n), p as *const i8)
        };
        let h = super::avx2::half16::<E5>(b);
        _mm512_cvtph_ps(h)
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn sum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512, n: usize) {
        if n == 16 {
            _mm512_storeu_ps(p, v)
        } else {
            _mm512_mask_storeu_ps(p, mask(n), v)
        }
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
}
