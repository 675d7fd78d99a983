//! FP8 GEMVs on 16 float32 lanes, written once against [`Lanes16`]: AVX-512 registers run
//! them for real (`avx512.rs`), and [`Model16`], plain arrays with the same operations, runs
//! the very same loops, tails and epilogues on any CPU (the tests, and machines without
//! AVX-512 that want to check the AVX-512 path).
//!
//! Tails (depths or columns that are not a multiple of 16) use masked loads and stores, so
//! every byte read or written is inside the operands.
#![allow(clippy::too_many_arguments)]

#[cfg(test)]
use super::E4M3_SCALED;
use super::{check_kn, check_nk, Mul};
use crate::fp8::Format;

/// 16 float32 lanes and the operations the wide GEMVs use.
///
/// # Safety
/// Implementations may use instructions the CPU lacks: callers of the kernels below guarantee
/// the implementation's instructions are available.
pub(crate) unsafe trait Lanes16 {
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    /// `n <= 16` floats at `p`, the other lanes 0.
    unsafe fn load(p: *const f32, n: usize) -> Self::V;
    /// `n <= 16` FP8 codes at `p` as float32 in the kernel domain (e5m2 exact; e4m3fn times
    /// 2^-8, NaN codes NaN), the other lanes 0.
    unsafe fn widen<const E5: bool>(p: *const u8, n: usize) -> Self::V;
    /// `a * b + c`, one rounding.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn sum(v: Self::V) -> f32;
    /// The first `n <= 16` lanes to `p`.
    unsafe fn store(p: *mut f32, v: Self::V, n: usize);
    /// A hint to fetch the cache line of `p` (which may lie past the data).
    unsafe fn prefetch(p: *const u8);
}

/// Bytes ahead the GEMVs prefetch their weight streams.
const PREFETCH_BYTES: usize = 2048;

/// `table::GemvNk` on `L`.
///
/// # Safety
/// `L`'s instructions must be available.
#[inline(always)]
pub(crate) unsafe fn gemv_nk<L: Lanes16>(
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
    check_nk(lhs.len(), rows, k, w.len(), ncols, out.len(), os);
    if let Some(s) = mul.per {
        assert!(s.len() >= ncols);
    }
    let (l, wp, o) = (lhs.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    macro_rules! go {
        ($e5:literal) => {
            match rows {
                1 => nk::<L, $e5, 1, 4>(l, k, wp, ncols, o, os, &mul),
                2 => nk::<L, $e5, 2, 4>(l, k, wp, ncols, o, os, &mul),
                3 => nk::<L, $e5, 3, 2>(l, k, wp, ncols, o, os, &mul),
                _ => nk::<L, $e5, 4, 2>(l, k, wp, ncols, o, os, &mul),
            }
        };
    }
    // SAFETY: the caller vouches for `L`; the asserts above bound every access `nk` makes:
    // lhs `r*k + kk`, weights `c*k + kk`, out `r*os + c`, scales `c < ncols`.
    match fmt {
        Format::E4m3fn => go!(false),
        Format::E5m2 => go!(true),
    }
}

/// `table::KnRows` on `L`.
///
/// # Safety
/// `L`'s instructions must be available.
#[inline(always)]
pub(crate) unsafe fn kn_rows<L: Lanes16>(
    fmt: Format,
    lhs: &[f32],
    ls: usize,
    rows: usize,
    kr: usize,
    w: &[u8],
    ncols: usize,
    acc: &mut [f32],
) {
    check_kn(lhs.len(), ls, rows, kr, w.len(), ncols, acc.len());
    let (l, wp, a) = (lhs.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
    macro_rules! go {
        ($e5:literal) => {
            match rows {
                1 => kn::<L, $e5, 1>(l, ls, kr, wp, ncols, a),
                2 => kn::<L, $e5, 2>(l, ls, kr, wp, ncols, a),
                3 => kn::<L, $e5, 3>(l, ls, kr, wp, ncols, a),
                _ => kn::<L, $e5, 4>(l, ls, kr, wp, ncols, a),
            }
        };
    }
    // SAFETY: the caller vouches for `L`; the asserts above bound every access `kn` makes:
    // lhs `r*ls + kk`, weights `kk*ncols + c`, acc `r*ncols + c`, for `r < rows`, `kk < kr`,
    // `c < ncols`.
    match fmt {
        Format::E4m3fn => go!(false),
        Format::E5m2 => go!(true),
    }
}

/// NK weights: blocks of `C` columns (each a contiguous row of `k` codes), `R` lhs rows.
#[inline(always)]
unsafe fn nk<L: Lanes16, const E5: bool, const R: usize, const C: usize>(
    lhs: *const f32,
    k: usize,
    w: *const u8,
    ncols: usize,
    out: *mut f32,
    os: usize,
    mul: &Mul,
) {
    let mut c = 0;
    while c + C <= ncols {
        nk_block::<L, E5, R, C>(lhs, k, w.add(c * k), out.add(c), os, mul, c);
        c += C;
    }
    while c < ncols {
        nk_block::<L, E5, R, 1>(lhs, k, w.add(c * k), out.add(c), os, mul, c);
        c += 1;
    }
}

#[inline(always)]
unsafe fn nk_block<L: Lanes16, const E5: bool, const R: usize, const C: usize>(
    lhs: *const f32,
    k: usize,
    w: *const u8,
    out: *mut f32,
    os: usize,
    mul: &Mul,
    c0: usize,
) {
    let mut acc = [[L::zero(); C]; R];
    let mut kk = 0;
    while kk < k {
        let n = (k - kk).min(16);
        if kk % 64 == 0 {
            for ci in 0..C {
                L::prefetch(w.wrapping_add(ci * k + kk + PREFETCH_BYTES));
            }
        }
        for ci in 0..C {
            let v = L::widen::<E5>(w.add(ci * k + kk), n);
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[ci] = L::fma(L::load(lhs.add(r * k + kk), n), v, acc[ci]);
            }
        }
        kk += 16;
    }
    for (r, acc) in acc.iter().enumerate() {
        for (ci, &a) in acc.iter().enumerate() {
            *out.add(r * os + ci) = L::sum(a) * mul.at(c0 + ci);
        }
    }
}

/// KN weights: two weight rows per pass (each accumulator is loaded and stored once per two
/// rows), 16 columns per step; every weight row is read front to back.
#[inline(always)]
unsafe fn kn<L: Lanes16, const E5: bool, const R: usize>(
    lhs: *const f32,
    ls: usize,
    kr: usize,
    w: *const u8,
    ncols: usize,
    acc: *mut f32,
) {
    std::ptr::write_bytes(acc, 0, R * ncols);
    let mut kk = 0;
    while kk < kr {
        let pair = kk + 1 < kr;
        let a0: [L::V; R] = std::array::from_fn(|r| L::splat(*lhs.add(r * ls + kk)));
        let a1: [L::V; R] =
            std::array::from_fn(|r| L::splat(if pair { *lhs.add(r * ls + kk + 1) } else { 0.0 }));
        let p0 = w.add(kk * ncols);
        let p1 = if pair { w.add((kk + 1) * ncols) } else { p0 };
        let mut c = 0;
        while c < ncols {
            let n = (ncols - c).min(16);
            if c % 64 == 0 {
                L::prefetch(p0.wrapping_add(c + PREFETCH_BYTES));
                L::prefetch(p1.wrapping_add(c + PREFETCH_BYTES));
            }
            let v0 = L::widen::<E5>(p0.add(c), n);
            for (r, a0) in a0.iter().enumerate() {
                let q = acc.add(r * ncols + c);
                let mut s = L::fma(*a0, v0, L::load(q, n));
                if pair {
                    s = L::fma(a1[r], L::widen::<E5>(p1.add(c), n), s);
                }
                L::store(q, s, n);
            }
            c += 16;
        }
        kk += if pair { 2 } else { 1 };
    }
}

/// [`Lanes16`] on plain arrays: what the AVX-512 instructions compute, lane by lane (`fma` is
/// `f32::mul_add`, one rounding like `vfmadd`; `widen` decodes exactly as the f16 widening
/// does). The horizontal sum's order differs from the hardware's, which only changes rounding.
#[cfg(test)]
pub(crate) struct Model16;

// SAFETY: plain Rust, no special instructions; the pointer contracts are those of the trait.
#[cfg(test)]
unsafe impl Lanes16 for Model16 {
    type V = [f32; 16];
    unsafe fn zero() -> [f32; 16] {
        [0.0; 16]
    }
    unsafe fn splat(x: f32) -> [f32; 16] {
        [x; 16]
    }
    unsafe fn load(p: *const f32, n: usize) -> [f32; 16] {
        // SAFETY: the caller guarantees `n` floats at `p`.
        std::array::from_fn(|i| if i < n { unsafe { *p.add(i) } } else { 0.0 })
    }
    unsafe fn widen<const E5: bool>(p: *const u8, n: usize) -> [f32; 16] {
        let tab = if E5 {
            super::table(Format::E5m2)
        } else {
            &*E4M3_SCALED
        };
        std::array::from_fn(|i| {
            if i < n {
                // SAFETY: the caller guarantees `n` codes at `p`.
                let q = unsafe { *p.add(i) };
                tab[q as usize]
            } else {
                0.0
            }
        })
    }
    unsafe fn fma(a: [f32; 16], b: [f32; 16], c: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }
    unsafe fn sum(v: [f32; 16]) -> f32 {
        let mut w = v;
        let mut half = 8;
        while half > 0 {
            for i in 0..half {
                w[i] += w[i + half];
            }
            half /= 2;
        }
        w[0]
    }
    unsafe fn store(p: *mut f32, v: [f32; 16], n: usize) {
        for (i, x) in v.iter().enumerate().take(n) {
            // SAFETY: the caller guarantees room for `n` floats at `p`.
            unsafe { *p.add(i) = *x };
        }
    }
    unsafe fn prefetch(_: *const u8) {}
}

/// The scalar table with the wide GEMVs running on [`Model16`] (tests).
#[cfg(test)]
pub(crate) static MODEL_TABLE: super::Kernels = super::Kernels {
    gemv_name: "avx512 GEMV on the software model",
    e4m3_unit: 256.0,
    gemv_nk: |fmt, lhs, rows, k, w, ncols, out, os, mul| {
        // SAFETY: the model uses no special instructions.
        unsafe { gemv_nk::<Model16>(fmt, lhs, rows, k, w, ncols, out, os, mul) }
    },
    kn_rows: |fmt, lhs, ls, rows, kr, w, ncols, acc| {
        // SAFETY: the model uses no special instructions.
        unsafe { kn_rows::<Model16>(fmt, lhs, ls, rows, kr, w, ncols, acc) }
    },
    ..super::table::SCALAR
};
