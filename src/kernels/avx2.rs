//! AVX2 + FMA + F16C kernels.
//!
//! FP8 bytes are widened to f16 bit patterns in 16-bit lanes and converted with `vcvtph2ps`:
//! e5m2 is exactly the high byte of an f16; e4m3fn becomes `s 0 eeee mmm 0000000`, i.e. its
//! value times 2^-8 (exact, subnormals included), with the NaN code patched to an f16 NaN.
//! The 2^8 is folded into the final per-column multiplier (see `Backend::domain`).
//!
//! The e4m3fn GEMVs have a cheaper conversion for their 32-byte steps (see `cvt32_direct`):
//! `vpshufb` puts each code in the top byte of an f32 lane and a shift and a mask make the f32
//! pattern of value * 2^-120 (e4m3fn subnormals become f32 subnormals); the activations are
//! multiplied by 2^112 beforehand, so the products land in the same 2^-8 domain. Four
//! `vpshufb`, four shifts and four masks per 32 codes replace the widening and the four
//! `vcvtph2ps`; a 168 MB NK GEMV streamed from memory about 1.2x faster on two cores (AMD
//! EPYC Zen 3, docs/performance-notes.md). It is used when every activation is below 2^15 in magnitude
//! (or not finite), so that the scaled copy stays finite, with MXCSR.DAZ cleared for the call
//! (XLA's threads may run with denormals flushed, which would zero the subnormal codes).
//!
//! The safe methods of [`Avx2`] re-check every bound the unsafe bodies rely on; an `Avx2`
//! value only exists when the CPU supports the instructions (see [`table`]).
#![allow(clippy::too_many_arguments)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{check_kn, check_nk, Kernels, Mul, MR, NR};
use crate::cpu::Isa;
use crate::fp8::Format;

/// Proof that AVX2, FMA and F16C are available: only [`table`] makes one, after checking.
#[derive(Clone, Copy)]
pub(crate) struct Avx2(());

/// The AVX2 kernel table, if this CPU has AVX2, FMA and F16C.
pub(super) fn table() -> Option<&'static Kernels> {
    (Isa::supported() >= Isa::Avx2).then_some(&TABLE)
}

/// The table's entries make an `Avx2` token: [`table`] hands the table out only after the
/// CPU check, so every call through it runs on a CPU with the instructions.
pub(super) static TABLE: Kernels = Kernels {
    isa: Isa::Avx2,
    gemv_name: "avx2 8-lane FMA",
    gemm_name: "avx2 FMA 6x16 f32 microkernel",
    e4m3_unit: 256.0,
    gemv_nk: |fmt, lhs, rows, k, w, ncols, out, os, mul| {
        Avx2(()).gemv_nk(fmt, lhs, rows, k, w, ncols, out, os, mul)
    },
    kn_rows: |fmt, lhs, ls, rows, kr, w, ncols, acc| {
        Avx2(()).kn_rows(fmt, lhs, ls, rows, kr, w, ncols, acc)
    },
    gemv_nk_f32: |lhs, rows, k, w, ncols, out, os| {
        Avx2(()).gemv_nk_f32(lhs, rows, k, w, ncols, out, os)
    },
    kn_rows_f32: |lhs, ls, rows, kr, w, ncols, acc| {
        Avx2(()).kn_rows_f32(lhs, ls, rows, kr, w, ncols, acc)
    },
    pack_kn: Some(|fmt, w, ws, kc, dst| Avx2(()).pack_kn(fmt, w, ws, kc, dst)),
    pack_nk: Some(|fmt, w, k, pc, kc, cols, dst| Avx2(()).pack_nk(fmt, w, k, pc, kc, cols, dst)),
    micro: |a, mr, lda, kc, b, c, col, cols, first, mul| {
        Avx2(()).micro(a, mr, lda, kc, b, c, col, cols, first, mul)
    },
    tile_gemm: None,
    tile_min_rows: usize::MAX,
};

fn check_mul(mul: &Mul, ncols: usize) {
    if let Some(s) = mul.per {
        assert!(s.len() >= ncols);
    }
}

fn scaled_table(fmt: Format) -> &'static [f32; 256] {
    match fmt {
        Format::E4m3fn => &super::E4M3_SCALED,
        Format::E5m2 => super::table(Format::E5m2),
    }
}

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// See `scalar::kn_rows` (same sums, in this backend's domain: e4m3fn times 2^-8).
    pub(super) fn kn_rows(
        self,
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
        let tab = scaled_table(fmt);
        let (l, wp, a) = (lhs.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        macro_rules! go {
            ($e5:literal, $direct:literal) => {
                match rows {
                    1 => kn_rows_impl::<$e5, 1, $direct>(l, ls, kr, wp, ncols, a, tab),
                    2 => kn_rows_impl::<$e5, 2, $direct>(l, ls, kr, wp, ncols, a, tab),
                    3 => kn_rows_impl::<$e5, 3, $direct>(l, ls, kr, wp, ncols, a, tab),
                    _ => kn_rows_impl::<$e5, 4, $direct>(l, ls, kr, wp, ncols, a, tab),
                }
            };
        }
        let direct = fmt == Format::E4m3fn
            && ncols >= 32
            && (0..rows.min(4)).all(|r| direct_fits(&lhs[r * ls..r * ls + kr]));
        // SAFETY: the token proves AVX2/FMA/F16C; the asserts above bound every access
        // `kn_rows_impl` makes: lhs `r*ls + kk`, weights `kk*ncols + c`, acc `r*ncols + c`, for
        // `r < rows`, `kk < kr`, `c < ncols`. The direct conversion runs with DAZ cleared
        // (`with_denormal_inputs`) on activations checked by `direct_fits`.
        let exact = unsafe {
            match fmt {
                Format::E4m3fn if direct => with_denormal_inputs(|| go!(false, true)),
                Format::E4m3fn => go!(false, false),
                Format::E5m2 => go!(true, false),
            }
        };
        if !exact {
            // e4m3fn NaN codes, which the fast conversion does not decode: redo it exactly.
            super::scalar::kn_rows(|q: u8| tab[q as usize], lhs, ls, rows, kr, w, ncols, acc);
        }
    }

    /// See `super::gemv_nk`.
    pub(super) fn gemv_nk(
        self,
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
        check_mul(&mul, ncols);
        let tab = scaled_table(fmt);
        let (l, wp, o) = (lhs.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        // The one- and two-row e4m3fn GEMVs read their 32-depth steps from a scaled copy of the
        // activations in `cvt32_direct`'s order, when the values allow it.
        let k32 = k - k % 32;
        let scaled = (fmt == Format::E4m3fn && rows <= 2 && k32 > 0 && ncols > 0)
            .then(|| direct_lhs(lhs, rows, k, k32))
            .flatten();
        let x = scaled.as_ref().map_or(l, |v| v.as_ptr());
        macro_rules! go {
            ($e5:literal, $direct:literal) => {
                match rows {
                    1 => nk::<$e5, 1, 4, true, $direct>(l, x, k, wp, ncols, o, os, &mul, tab),
                    2 => nk::<$e5, 2, 2, true, $direct>(l, x, k, wp, ncols, o, os, &mul, tab),
                    3 => nk::<$e5, 3, 1, false, false>(l, x, k, wp, ncols, o, os, &mul, tab),
                    _ => nk::<$e5, 4, 1, false, false>(l, x, k, wp, ncols, o, os, &mul, tab),
                }
            };
        }
        // SAFETY: the token proves AVX2/FMA/F16C; the asserts above bound every access `nk`
        // makes: lhs `r*k + kk`, weights `c*k + kk`, out `r*os + c`, scales `c < ncols`; with
        // a scaled copy (`rows * k32` values, made by `direct_lhs`), `x[r*k32 + kk]` for
        // `kk < k32`, run with DAZ cleared (`with_denormal_inputs`).
        unsafe {
            match fmt {
                Format::E4m3fn if scaled.is_some() => with_denormal_inputs(|| go!(false, true)),
                Format::E4m3fn => go!(false, false),
                Format::E5m2 => go!(true, false),
            }
        }
    }

    /// `scalar::kn_rows` for float32 weights.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kn_rows_f32(
        self,
        lhs: &[f32],
        ls: usize,
        rows: usize,
        kr: usize,
        w: &[f32],
        ncols: usize,
        acc: &mut [f32],
    ) {
        check_kn(lhs.len(), ls, rows, kr, w.len(), ncols, acc.len());
        let (l, wp, a) = (lhs.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        // SAFETY: the token proves AVX2/FMA; the asserts above bound every access
        // `kn_rows_f32_impl` makes: lhs `r*ls + kk`, weights `kk*ncols + c`, acc `r*ncols + c`,
        // for `r < rows`, `kk < kr`, `c < ncols`.
        unsafe {
            match rows {
                1 => kn_rows_f32_impl::<1>(l, ls, kr, wp, ncols, a),
                2 => kn_rows_f32_impl::<2>(l, ls, kr, wp, ncols, a),
                3 => kn_rows_f32_impl::<3>(l, ls, kr, wp, ncols, a),
                _ => kn_rows_f32_impl::<4>(l, ls, kr, wp, ncols, a),
            }
        }
    }

    /// `super::scalar::gemv_nk` for float32 weights (no column factor).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemv_nk_f32(
        self,
        lhs: &[f32],
        rows: usize,
        k: usize,
        w: &[f32],
        ncols: usize,
        out: &mut [f32],
        os: usize,
    ) {
        check_nk(lhs.len(), rows, k, w.len(), ncols, out.len(), os);
        let (l, wp, o) = (lhs.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        // SAFETY: the token proves AVX2/FMA; the asserts above bound every access
        // `nk_f32_impl` makes: lhs `r*k + kk`, weights `c*k + kk`, out `r*os + c`.
        unsafe {
            match rows {
                1 => nk_f32_impl::<1, 4>(l, k, wp, ncols, o, os),
                2 => nk_f32_impl::<2, 2>(l, k, wp, ncols, o, os),
                3 => nk_f32_impl::<3, 1>(l, k, wp, ncols, o, os),
                _ => nk_f32_impl::<4, 1>(l, k, wp, ncols, o, os),
            }
        }
    }

    /// Converts 16 consecutive bytes of `kc` rows (`w[kk*ws..kk*ws+16]`) into `dst[kk*16..]`.
    pub(super) fn pack_kn(self, fmt: Format, w: &[u8], ws: usize, kc: usize, dst: &mut [f32]) {
        assert!(kc >= 1 && w.len() >= (kc - 1) * ws + NR && dst.len() >= kc * NR);
        let (wp, d) = (w.as_ptr(), dst.as_mut_ptr());
        // SAFETY: the token proves AVX2/FMA/F16C; reads `kk*ws .. kk*ws+16` and writes
        // `kk*16 .. kk*16+16` for `kk < kc`, inside the asserted lengths.
        unsafe {
            match fmt {
                Format::E4m3fn => pack_kn_impl::<false>(wp, ws, kc, d),
                Format::E5m2 => pack_kn_impl::<true>(wp, ws, kc, d),
            }
        }
    }

    /// Packs depths `pc..pc+kc` of `cols` NK columns (`w[x*k + kk]`) into `dst[kk*16 + x]`,
    /// zero-filling columns `cols..16`.
    pub(super) fn pack_nk(
        self,
        fmt: Format,
        w: &[u8],
        k: usize,
        pc: usize,
        kc: usize,
        cols: usize,
        dst: &mut [f32],
    ) {
        assert!(cols <= NR && pc + kc <= k && w.len() >= cols * k && dst.len() >= kc * NR);
        let tab = scaled_table(fmt);
        let (wp, d) = (w.as_ptr(), dst.as_mut_ptr());
        // SAFETY: the token proves AVX2/FMA/F16C; reads `w[x*k + pc + kk]` and writes
        // `dst[kk*16 + x]` for `x < 16`, `kk < kc`, inside the asserted lengths (columns
        // `x >= cols` are only written).
        unsafe {
            match fmt {
                Format::E4m3fn => pack_nk_impl::<false>(wp, k, pc, kc, cols, d, tab),
                Format::E5m2 => pack_nk_impl::<true>(wp, k, pc, kc, cols, d, tab),
            }
        }
    }

    /// See `super::micro`.
    pub(super) fn micro(
        self,
        a: &[f32],
        mr: usize,
        lda: usize,
        kc: usize,
        b: &[f32],
        c: &mut [&mut [f32]],
        col: usize,
        cols: usize,
        first: bool,
        mul: Option<&[f32; NR]>,
    ) {
        assert!((1..=MR).contains(&mr) && (1..=NR).contains(&cols) && c.len() >= mr);
        assert!(a.len() >= (mr - 1) * lda + kc && b.len() >= kc * NR);
        let mut cp = [std::ptr::null_mut::<f32>(); MR];
        for (p, row) in cp.iter_mut().zip(c.iter_mut()).take(mr) {
            assert!(row.len() >= col + cols);
            *p = row[col..].as_mut_ptr();
        }
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        // SAFETY: the token proves AVX2/FMA/F16C; `micro_impl` reads `a[r*lda + kk]`,
        // `b[kk*16 .. kk*16+16]` and reads/writes `cp[r][x]` (= `c[r][col + x]`) for `r < mr`,
        // `kk < kc`, `x < cols`, all inside the asserted lengths; the rows are distinct slices.
        unsafe {
            match mr {
                1 => micro_impl::<1>(ap, lda, kc, bp, &cp, cols, first, mul),
                2 => micro_impl::<2>(ap, lda, kc, bp, &cp, cols, first, mul),
                3 => micro_impl::<3>(ap, lda, kc, bp, &cp, cols, first, mul),
                4 => micro_impl::<4>(ap, lda, kc, bp, &cp, cols, first, mul),
                5 => micro_impl::<5>(ap, lda, kc, bp, &cp, cols, first, mul),
                _ => micro_impl::<6>(ap, lda, kc, bp, &cp, cols, first, mul),
            }
        }
    }
}

/// Bytes ahead a KN GEMV prefetches in the stream of its slab, one prefetch per cache line.
/// (Prefetching each line twice, or 16 KiB ahead, streamed Gemma3-270M's KN shapes from DRAM up
/// to 25 % slower on two threads.)
const KN_PREFETCH_BYTES: usize = 4096;
/// Bytes ahead an NK GEMV prefetches.
const NK_PREFETCH_BYTES: usize = 4096;

// The helpers marked `#[inline(always)]` are only called from `#[target_feature]` functions,
// into which they (and the intrinsics they use) are inlined.

/// 16 FP8 codes as the f16 bit patterns (16-bit lanes) of their values (e5m2) or of 2^-8
/// times their values (e4m3fn, NaN codes as f16 NaN).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn half16<const E5: bool>(b: __m128i) -> __m256i {
    if E5 {
        _mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(b))
    } else {
        // Sign-extended then shifted: bits 15 and 14 hold the sign, 13..7 exponent and
        // mantissa; clearing bit 14 leaves the f16 pattern of value * 2^-8.
        let w = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(b));
        let h = _mm256_and_si256(w, _mm256_set1_epi16(0xBFFFu16 as i16));
        let mag = _mm256_and_si256(h, _mm256_set1_epi16(0x7FFF));
        let nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x3F80));
        _mm256_or_si256(h, nan)
    }
}

/// 16 FP8 codes at `p` as two vectors of 8 f32 (e4m3fn: times 2^-8).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn cvt16<const E5: bool>(p: *const u8) -> (__m256, __m256) {
    let h = half16::<E5>(_mm_loadu_si128(p as *const __m128i));
    (
        _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)),
    )
}

/// `lhs[r*ls]` and `lhs[r*ls + 1]` times `scale`, broadcast, for the rows `r < R`: the
/// multipliers of two consecutive weight rows in a KN pass.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pair_multipliers<const R: usize>(
    lhs: *const f32,
    ls: usize,
    scale: f32,
) -> [[__m256; 2]; R] {
    std::array::from_fn(|r| {
        [
            _mm256_set1_ps(*lhs.add(r * ls) * scale),
            _mm256_set1_ps(*lhs.add(r * ls + 1) * scale),
        ]
    })
}

/// The body of `Avx2::kn_rows`: two weight rows per pass (each accumulator is loaded and
/// stored once per two rows), 32 columns per step with `cvt32`, the last columns exactly with
/// `cvt16` and the table. Each weight row is read front to back, so the slab streams from
/// memory in order. Returns false if it met e4m3fn NaN codes (then `acc` is not valid).
/// `DIRECT` (e4m3fn only): the 32-column steps use `cvt32_direct` with the multipliers times
/// `DIRECT_LHS_SCALE` (the caller checked them with `direct_fits` and cleared DAZ); their
/// accumulators are kept in `DIRECT_ORDER` and put back in column order at the end; with one
/// lhs row, four weight rows per pass (0.95-1.17x the speed of two from cache on Gemma3-270M's
/// shapes, faster on the larger ones; docs/performance-notes.md).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kn_rows_impl<const E5: bool, const R: usize, const DIRECT: bool>(
    lhs: *const f32,
    ls: usize,
    kr: usize,
    w: *const u8,
    ncols: usize,
    acc: *mut f32,
    tab: &[f32; 256],
) -> bool {
    std::ptr::write_bytes(acc, 0, R * ncols);
    let c32 = ncols - ncols % 32;
    let mut nan = NanScan::new();
    let scale = if DIRECT { DIRECT_LHS_SCALE } else { 1.0 };
    let order = cvt32_offsets(DIRECT);
    let mut kk = 0;
    if DIRECT && R == 1 {
        // One lhs row (decode): four weight rows per pass, the four accumulators of a step
        // held in registers across them, so each is loaded and stored once per four rows.
        while kk + 4 <= kr {
            let p: [*const u8; 4] = std::array::from_fn(|i| w.add((kk + i) * ncols));
            let a: [__m256; 4] = std::array::from_fn(|i| _mm256_set1_ps(*lhs.add(kk + i) * scale));
            let mut c = 0;
            while c < c32 {
                // 128 bytes of the stream per step: two prefetches.
                let ahead = p[0].wrapping_add(4 * c + KN_PREFETCH_BYTES);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
                let q = acc.add(c);
                let mut s: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(q.add(8 * j)));
                for (p, a) in p.iter().zip(&a) {
                    let b = _mm256_loadu_si256(p.add(c) as *const __m256i);
                    nan.add(b);
                    let v = cvt32_direct(b);
                    for j in 0..4 {
                        s[j] = _mm256_fmadd_ps(*a, v[j], s[j]);
                    }
                }
                for (j, s) in s.iter().enumerate() {
                    _mm256_storeu_ps(q.add(8 * j), *s);
                }
                c += 32;
            }
            for (i, p) in p.iter().enumerate() {
                kn_row_tail::<E5, R>(lhs.add(kk + i), ls, *p, c32, ncols, acc, tab);
            }
            kk += 4;
        }
    }
    while kk + 2 <= kr {
        let (p0, p1) = (w.add(kk * ncols), w.add((kk + 1) * ncols));
        let a = pair_multipliers::<R>(lhs.add(kk), ls, scale);
        let mut c = 0;
        while c < c32 {
            // The pass reads rows kk and kk+1, which are adjacent: 64 bytes of the stream
            // per step, so one prefetch per step covers the stream KN_PREFETCH_BYTES ahead.
            _mm_prefetch::<_MM_HINT_T0>(p0.wrapping_add(2 * c + KN_PREFETCH_BYTES) as *const i8);
            let b0 = _mm256_loadu_si256(p0.add(c) as *const __m256i);
            let b1 = _mm256_loadu_si256(p1.add(c) as *const __m256i);
            if !E5 {
                nan.add(b0);
                nan.add(b1);
            }
            let (v0, v1) = (cvt32_any::<E5, DIRECT>(b0), cvt32_any::<E5, DIRECT>(b1));
            for (r, a) in a.iter().enumerate() {
                for j in 0..4 {
                    let q = acc.add(r * ncols + c + order[j]);
                    let s = _mm256_fmadd_ps(a[0], v0[j], _mm256_loadu_ps(q));
                    _mm256_storeu_ps(q, _mm256_fmadd_ps(a[1], v1[j], s));
                }
            }
            c += 32;
        }
        kn_row_tail::<E5, R>(lhs.add(kk), ls, p0, c32, ncols, acc, tab);
        kn_row_tail::<E5, R>(lhs.add(kk + 1), ls, p1, c32, ncols, acc, tab);
        kk += 2;
    }
    if kk < kr {
        let p = w.add(kk * ncols);
        let mut c = 0;
        while c < c32 {
            let b = _mm256_loadu_si256(p.add(c) as *const __m256i);
            if !E5 {
                nan.add(b);
            }
            let v = cvt32_any::<E5, DIRECT>(b);
            for r in 0..R {
                let a = _mm256_set1_ps(*lhs.add(r * ls + kk) * scale);
                for (j, &v) in v.iter().enumerate() {
                    let q = acc.add(r * ncols + c + order[j]);
                    _mm256_storeu_ps(q, _mm256_fmadd_ps(a, v, _mm256_loadu_ps(q)));
                }
            }
            c += 32;
        }
        kn_row_tail::<E5, R>(lhs.add(kk), ls, p, c32, ncols, acc, tab);
    }
    if DIRECT {
        for r in 0..R {
            let mut c = 0;
            while c < c32 {
                let q = acc.add(r * ncols + c);
                let mut block = [0.0f32; 32];
                for (slot, &col) in DIRECT_ORDER.iter().enumerate() {
                    block[col] = *q.add(slot);
                }
                std::ptr::copy_nonoverlapping(block.as_ptr(), q, 32);
                c += 32;
            }
        }
    }
    E5 || !nan.found()
}

/// Columns `from..ncols` of one weight row `p` (times `lhs[r*ls]` for each row r) into `acc`,
/// with the exact conversions: 16 at a time with `cvt16`, then one by one with the table.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kn_row_tail<const E5: bool, const R: usize>(
    lhs: *const f32,
    ls: usize,
    p: *const u8,
    from: usize,
    ncols: usize,
    acc: *mut f32,
    tab: &[f32; 256],
) {
    let mut c = from;
    while c + 16 <= ncols {
        let (lo, hi) = cvt16::<E5>(p.add(c));
        for r in 0..R {
            let a = _mm256_set1_ps(*lhs.add(r * ls));
            for (h, v) in [(0, lo), (8, hi)] {
                let q = acc.add(r * ncols + c + h);
                _mm256_storeu_ps(q, _mm256_fmadd_ps(a, v, _mm256_loadu_ps(q)));
            }
        }
        c += 16;
    }
    for c in c..ncols {
        let v = tab[*p.add(c) as usize];
        for r in 0..R {
            *acc.add(r * ncols + c) += *lhs.add(r * ls) * v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Adds 16 depths of column `ci` (`lo`, `hi`) times each lhs row `r` (16 floats at
/// `lhs + r*k`) into that row's two accumulators of the column.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fma16_rows<const R: usize, const C: usize>(
    acc: &mut [[[__m256; 2]; C]; R],
    ci: usize,
    lhs: *const f32,
    k: usize,
    lo: __m256,
    hi: __m256,
) {
    for (r, acc) in acc.iter_mut().enumerate() {
        let a = lhs.add(r * k);
        acc[ci][0] = _mm256_fmadd_ps(_mm256_loadu_ps(a), lo, acc[ci][0]);
        acc[ci][1] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(8)), hi, acc[ci][1]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nk<
    const E5: bool,
    const R: usize,
    const C: usize,
    const FAST: bool,
    const DIRECT: bool,
>(
    lhs: *const f32,
    x: *const f32,
    k: usize,
    w: *const u8,
    ncols: usize,
    out: *mut f32,
    os: usize,
    mul: &Mul,
    tab: &[f32; 256],
) {
    let mut c = 0;
    while c + C <= ncols {
        let w = w.add(c * k);
        if !FAST || !nk_fast::<E5, R, C, DIRECT>(lhs, x, k, w, out.add(c), os, mul, c, tab) {
            // Not handled by the fast conversion (or NaN codes present): exact conversion.
            nk_block::<E5, R, C>(lhs, k, w, out.add(c), os, mul, c, tab);
        }
        c += C;
    }
    while c < ncols {
        nk_block::<E5, R, 1>(lhs, k, w.add(c * k), out.add(c), os, mul, c, tab);
        c += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nk_block<const E5: bool, const R: usize, const C: usize>(
    lhs: *const f32,
    k: usize,
    w: *const u8,
    out: *mut f32,
    os: usize,
    mul: &Mul,
    c0: usize,
    tab: &[f32; 256],
) {
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    let k16 = k - k % 16;
    let mut kk = 0;
    let mut pf = w.wrapping_add(NK_PREFETCH_BYTES);
    while kk < k16 {
        // The columns of a block are contiguous: sweep one prefetch line per 64 bytes consumed,
        // a fixed distance ahead (each column alone is too short for the hardware prefetcher).
        for _ in 0..C.div_ceil(4) {
            _mm_prefetch::<_MM_HINT_T0>(pf as *const i8);
            pf = pf.wrapping_add(64);
        }
        for ci in 0..C {
            let (lo, hi) = cvt16::<E5>(w.add(ci * k + kk));
            fma16_rows(&mut acc, ci, lhs.add(kk), k, lo, hi);
        }
        kk += 16;
    }
    for (r, acc) in acc.iter().enumerate() {
        for (ci, acc) in acc.iter().enumerate() {
            let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
            for kk in k16..k {
                s += *lhs.add(r * k + kk) * tab[*w.add(ci * k + kk) as usize];
            }
            *out.add(r * os + ci) = s * mul.at(c0 + ci);
        }
    }
}

/// Output columns (or depths) of the four vectors `cvt32` returns, relative to its first byte:
/// the in-lane unpacks interleave the two 16-byte halves.
const CVT32_ORDER: [usize; 4] = [0, 16, 8, 24];

/// 32 FP8 codes as four vectors of 8 f32 (in `CVT32_ORDER`; e4m3fn: times 2^-8), without the
/// e4m3fn NaN fix: the callers check for NaN codes with `NanScan` and fall back to `cvt16`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn cvt32<const E5: bool>(b: __m256i) -> [__m256; 4] {
    let z = _mm256_setzero_si256();
    // Words holding `code << 8`.
    let mut lo = _mm256_unpacklo_epi8(z, b);
    let mut hi = _mm256_unpackhi_epi8(z, b);
    if !E5 {
        // s eeee mmm 0.. -> s s eeee mmm 0.. -> s 0 eeee mmm 0..: the f16 of value * 2^-8.
        let keep = _mm256_set1_epi16(0xBFFFu16 as i16);
        lo = _mm256_and_si256(_mm256_srai_epi16::<1>(lo), keep);
        hi = _mm256_and_si256(_mm256_srai_epi16::<1>(hi), keep);
    }
    [
        _mm256_cvtph_ps(_mm256_castsi256_si128(lo)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(lo)),
        _mm256_cvtph_ps(_mm256_castsi256_si128(hi)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(hi)),
    ]
}

/// Offsets, relative to the first of 32 codes, of the 32 f32 lanes `cvt32_direct` returns
/// (vector `j`, lane `t`): `vpshufb` stays within 16-byte halves, so vector `j` holds codes
/// `4j..4j+4` of each half.
const DIRECT_ORDER: [usize; 32] = {
    let mut o = [0; 32];
    let mut slot = 0;
    while slot < 32 {
        let (j, t) = (slot / 8, slot % 8);
        o[slot] = if t < 4 { 4 * j + t } else { 16 + 4 * j + t - 4 };
        slot += 1;
    }
    o
};

/// 2^112: `cvt32_direct` yields value * 2^-120, so activations times this give products in
/// the backend's 2^-8 domain.
const DIRECT_LHS_SCALE: f32 = f32::from_bits((127 + 112) << 23);

/// Activations below 2^15 in magnitude stay finite times `DIRECT_LHS_SCALE`.
const DIRECT_MAX_LHS: f32 = 32768.0;

/// Whether `cvt32_direct`'s GEMVs may take these activations: every finite one below
/// `DIRECT_MAX_LHS` in magnitude (NaN and infinities stay what they are when scaled).
fn direct_fits(x: &[f32]) -> bool {
    x.iter().all(|v| v.abs() < DIRECT_MAX_LHS || !v.is_finite())
}

/// The first `k32` activations of each of the `rows` rows (stride `k`) times
/// `DIRECT_LHS_SCALE`, each 32 in `DIRECT_ORDER`; None if `direct_fits` refuses them.
fn direct_lhs(lhs: &[f32], rows: usize, k: usize, k32: usize) -> Option<Vec<f32>> {
    let mut out = Vec::with_capacity(rows * k32);
    for r in 0..rows {
        let row = &lhs[r * k..r * k + k32];
        if !direct_fits(row) {
            return None;
        }
        for block in row.chunks_exact(32) {
            out.extend(DIRECT_ORDER.iter().map(|&c| block[c] * DIRECT_LHS_SCALE));
        }
    }
    Some(out)
}

/// MXCSR, the SSE/AVX floating-point control and status register of this thread.
#[cfg(target_arch = "x86_64")]
fn mxcsr() -> u32 {
    let mut csr = 0u32;
    // SAFETY: `stmxcsr` stores MXCSR into the 4 bytes of `csr`.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
    }
    csr
}

/// Loads `csr` into MXCSR.
///
/// # Safety
/// `csr` must be a value read by [`mxcsr`] with at most its FTZ (bit 15) and DAZ (bit 6) flags
/// changed: no reserved bit, no unmasked exception, and the rounding mode Rust code assumes.
#[cfg(target_arch = "x86_64")]
unsafe fn set_mxcsr(csr: u32) {
    // SAFETY: `ldmxcsr` loads the 4 bytes of `csr`, valid by the caller's contract.
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags));
    }
}

/// Runs `f` with MXCSR's denormals-are-zero flag cleared, restoring the caller's MXCSR after.
/// `cvt32_direct` makes f32 subnormals of the e4m3fn subnormal codes, and threads that flush
/// denormals (XLA's may) would read them as zero. Clearing DAZ returns to the floating-point
/// environment Rust code is compiled for; nothing else in the register changes.
#[cfg(target_arch = "x86_64")]
fn with_denormal_inputs<T>(f: impl FnOnce() -> T) -> T {
    const DAZ: u32 = 1 << 6;
    struct Restore(u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: the MXCSR read before `f` ran.
            unsafe { set_mxcsr(self.0) };
        }
    }
    let csr = mxcsr();
    if csr & DAZ == 0 {
        return f();
    }
    let _restore = Restore(csr);
    // SAFETY: the MXCSR just read, with DAZ cleared.
    unsafe { set_mxcsr(csr & !DAZ) };
    f()
}

/// 32 e4m3fn codes as four vectors of 8 f32 holding value * 2^-120 (in `DIRECT_ORDER`), NaN
/// codes not decoded (the callers check with `NanScan`): each code goes to the top byte of a
/// lane (`s eeee mmm` then 24 zeros), an arithmetic shift by 4 moves exponent and mantissa to
/// f32's bits 26..20 and copies the sign into bits 31..27, and the mask keeps bits 31 and
/// 26..0. Exponent field `eeee` (bias 7) read with f32's bias 127 is the 2^-120; code
/// exponent 0 gives the f32 subnormal of the same mantissa, exact too.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn cvt32_direct(codes: __m256i) -> [__m256; 4] {
    let keep = _mm256_set1_epi32(0x87FF_FFFFu32 as i32);
    // Byte `4j + i` of each half to the top byte of dword `i`, zeros elsewhere.
    let pick = |j: i8| {
        let (i0, i1, i2, i3) = (4 * j, 4 * j + 1, 4 * j + 2, 4 * j + 3);
        #[rustfmt::skip]
        let m = _mm256_setr_epi8(
            -1, -1, -1, i0, -1, -1, -1, i1, -1, -1, -1, i2, -1, -1, -1, i3,
            -1, -1, -1, i0, -1, -1, -1, i1, -1, -1, -1, i2, -1, -1, -1, i3,
        );
        let top = _mm256_shuffle_epi8(codes, m);
        _mm256_castsi256_ps(_mm256_and_si256(_mm256_srai_epi32::<4>(top), keep))
    };
    [pick(0), pick(1), pick(2), pick(3)]
}

/// The four vectors of 32 codes: `cvt32_direct` (e4m3fn, activations scaled by the caller) if
/// `DIRECT`, else `cvt32`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn cvt32_any<const E5: bool, const DIRECT: bool>(b: __m256i) -> [__m256; 4] {
    if DIRECT {
        cvt32_direct(b)
    } else {
        cvt32::<E5>(b)
    }
}

/// Where the four vectors of `cvt32_any` go, relative to the first of the 32 codes: `DIRECT`
/// consumers keep their activations or accumulators in `DIRECT_ORDER`, so the vectors are
/// consecutive; otherwise `CVT32_ORDER`.
const fn cvt32_offsets(direct: bool) -> [usize; 4] {
    if direct {
        [0, 8, 16, 24]
    } else {
        CVT32_ORDER
    }
}

/// Looks for the e4m3fn NaN codes 0x7F and 0xFF among many codes: they are the largest signed
/// and the largest unsigned byte, so a running signed and unsigned maximum finds them with two
/// ops per 32 codes and no constant (and/cmpeq/or took three and a mask register, which the
/// one-row NK block had to spill).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct NanScan(__m256i, __m256i);

#[cfg(target_arch = "x86_64")]
impl NanScan {
    #[inline(always)]
    unsafe fn new() -> NanScan {
        NanScan(_mm256_setzero_si256(), _mm256_setzero_si256())
    }

    #[inline(always)]
    unsafe fn add(&mut self, b: __m256i) {
        self.0 = _mm256_max_epi8(self.0, b);
        self.1 = _mm256_max_epu8(self.1, b);
    }

    #[inline(always)]
    unsafe fn found(self) -> bool {
        let hit = _mm256_or_si256(
            _mm256_cmpeq_epi8(self.0, _mm256_set1_epi8(0x7F)),
            _mm256_cmpeq_epi8(self.1, _mm256_set1_epi8(-1)),
        );
        _mm256_testz_si256(hit, hit) == 0
    }
}

/// NK block of `C` columns with `cvt32` over the depths that are a multiple of 32. Returns
/// false (nothing written) if those hold e4m3fn NaN codes. `DIRECT` (e4m3fn only): with
/// `cvt32_direct`, reading those depths from `x`, the rows' first `k32` activations times
/// `DIRECT_LHS_SCALE` in `DIRECT_ORDER` (row stride `k32`; see `direct_lhs`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nk_fast<const E5: bool, const R: usize, const C: usize, const DIRECT: bool>(
    lhs: *const f32,
    x: *const f32,
    k: usize,
    w: *const u8,
    out: *mut f32,
    os: usize,
    mul: &Mul,
    c0: usize,
    tab: &[f32; 256],
) -> bool {
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    let mut nan = NanScan::new();
    let k32 = k - k % 32;
    let mut pf = w.wrapping_add(NK_PREFETCH_BYTES);
    let mut kk = 0;
    while kk < k32 {
        for _ in 0..C.div_ceil(2) {
            _mm_prefetch::<_MM_HINT_T0>(pf as *const i8);
            pf = pf.wrapping_add(64);
        }
        for ci in 0..C {
            let b = _mm256_loadu_si256(w.add(ci * k + kk) as *const __m256i);
            if !E5 {
                nan.add(b);
            }
            let v = cvt32_any::<E5, DIRECT>(b);
            let order = cvt32_offsets(DIRECT);
            let a = if DIRECT { x.add(kk) } else { lhs.add(kk) };
            let rs = if DIRECT { k32 } else { k };
            // e4m3fn, one row: a single chain per column (the C columns interleave, which
            // hides the FMA latency), so that with `NanScan` the accumulators, the converted
            // vectors and the constants fit in the 16 registers; two chains spilled and ran
            // 5-8 % slower. Otherwise two chains per column (e5m2 lost 2.5 % with one).
            let j = if R == 1 && !E5 { 0 } else { 1 };
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = a.add(r * rs);
                let s = &mut acc[ci];
                s[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(order[0])), v[0], s[0]);
                s[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(order[1])), v[1], s[j]);
                s[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(order[2])), v[2], s[0]);
                s[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(order[3])), v[3], s[j]);
            }
        }
        kk += 32;
    }
    if !E5 && nan.found() {
        return false;
    }
    // Remaining depths: 16 at a time with the exact conversion, then one by one.
    while kk + 16 <= k {
        for ci in 0..C {
            let (lo, hi) = cvt16::<E5>(w.add(ci * k + kk));
            fma16_rows(&mut acc, ci, lhs.add(kk), k, lo, hi);
        }
        kk += 16;
    }
    for (r, acc) in acc.iter().enumerate() {
        for (ci, acc) in acc.iter().enumerate() {
            let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
            for kk in kk..k {
                s += *lhs.add(r * k + kk) * tab[*w.add(ci * k + kk) as usize];
            }
            *out.add(r * os + ci) = s * mul.at(c0 + ci);
        }
    }
    true
}

/// The body of `Avx2::kn_rows_f32`: two weight rows per pass (each accumulator is loaded and
/// stored once per two rows), 8 columns per step, the last columns one by one; every weight
/// row is read front to back.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kn_rows_f32_impl<const R: usize>(
    lhs: *const f32,
    ls: usize,
    kr: usize,
    w: *const f32,
    ncols: usize,
    acc: *mut f32,
) {
    std::ptr::write_bytes(acc, 0, R * ncols);
    let c8 = ncols - ncols % 8;
    let mut kk = 0;
    while kk + 2 <= kr {
        let (p0, p1) = (w.add(kk * ncols), w.add((kk + 1) * ncols));
        let a = pair_multipliers::<R>(lhs.add(kk), ls, 1.0);
        let mut c = 0;
        while c < c8 {
            // As in `kn_rows_impl`: 64 bytes of the stream per step.
            _mm_prefetch::<_MM_HINT_T0>(p0.wrapping_add(2 * c + KN_PREFETCH_BYTES / 4) as *const i8);
            let (v0, v1) = (_mm256_loadu_ps(p0.add(c)), _mm256_loadu_ps(p1.add(c)));
            for (r, a) in a.iter().enumerate() {
                let q = acc.add(r * ncols + c);
                let s = _mm256_fmadd_ps(a[0], v0, _mm256_loadu_ps(q));
                _mm256_storeu_ps(q, _mm256_fmadd_ps(a[1], v1, s));
            }
            c += 8;
        }
        kn_row_tail_f32::<R>(lhs.add(kk), ls, p0, c8, ncols, acc);
        kn_row_tail_f32::<R>(lhs.add(kk + 1), ls, p1, c8, ncols, acc);
        kk += 2;
    }
    if kk < kr {
        kn_row_tail_f32::<R>(lhs.add(kk), ls, w.add(kk * ncols), 0, ncols, acc);
    }
}

/// Columns `from..ncols` of one weight row `p` (times `lhs[r*ls]` for each row r) into `acc`:
/// 8 at a time, then one by one.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kn_row_tail_f32<const R: usize>(
    lhs: *const f32,
    ls: usize,
    p: *const f32,
    from: usize,
    ncols: usize,
    acc: *mut f32,
) {
    let mut c = from;
    while c + 8 <= ncols {
        let v = _mm256_loadu_ps(p.add(c));
        for r in 0..R {
            let q = acc.add(r * ncols + c);
            let a = _mm256_set1_ps(*lhs.add(r * ls));
            _mm256_storeu_ps(q, _mm256_fmadd_ps(a, v, _mm256_loadu_ps(q)));
        }
        c += 8;
    }
    for c in c..ncols {
        for r in 0..R {
            *acc.add(r * ncols + c) += *lhs.add(r * ls) * *p.add(c);
        }
    }
}

/// The body of `Avx2::gemv_nk_f32`: blocks of `C` columns (contiguous weight rows), 16 depths
/// per step into two accumulators per row and column, the last depths one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nk_f32_impl<const R: usize, const C: usize>(
    lhs: *const f32,
    k: usize,
    w: *const f32,
    ncols: usize,
    out: *mut f32,
    os: usize,
) {
    let k16 = k - k % 16;
    let mut c0 = 0;
    while c0 < ncols {
        // A full block of C columns, or the last columns one at a time.
        let cols = if c0 + C <= ncols { C } else { 1 };
        let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
        let mut pf = w.wrapping_add(c0 * k + NK_PREFETCH_BYTES / 4);
        let mut kk = 0;
        while kk < k16 {
            // The block's columns are contiguous and each step consumes one 64-byte line of
            // each: sweep as many prefetch lines, a fixed distance ahead.
            for _ in 0..cols {
                _mm_prefetch::<_MM_HINT_T0>(pf as *const i8);
                pf = pf.wrapping_add(16);
            }
            for ci in 0..cols {
                let p = w.add((c0 + ci) * k + kk);
                let (lo, hi) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                fma16_rows(&mut acc, ci, lhs.add(kk), k, lo, hi);
            }
            kk += 16;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (ci, acc) in acc.iter().enumerate().take(cols) {
                let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
                for kk in k16..k {
                    s += *lhs.add(r * k + kk) * *w.add((c0 + ci) * k + kk);
                }
                *out.add(r * os + c0 + ci) = s;
            }
        }
        c0 += cols;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_kn_impl<const E5: bool>(w: *const u8, ws: usize, kc: usize, dst: *mut f32) {
    for kk in 0..kc {
        let (lo, hi) = cvt16::<E5>(w.add(kk * ws));
        _mm256_storeu_ps(dst.add(kk * NR), lo);
        _mm256_storeu_ps(dst.add(kk * NR + 8), hi);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_nk_impl<const E5: bool>(
    w: *const u8,
    k: usize,
    pc: usize,
    kc: usize,
    cols: usize,
    dst: *mut f32,
    tab: &[f32; 256],
) {
    for x in 0..NR {
        if x >= cols {
            for kk in 0..kc {
                *dst.add(kk * NR + x) = 0.0;
            }
            continue;
        }
        let col = w.add(x * k + pc);
        let mut kk = 0;
        while kk + 16 <= kc {
            let (lo, hi) = cvt16::<E5>(col.add(kk));
            let mut tmp = [0.0f32; 16];
            _mm256_storeu_ps(tmp.as_mut_ptr(), lo);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi);
            for (t, &v) in tmp.iter().enumerate() {
                *dst.add((kk + t) * NR + x) = v;
            }
            kk += 16;
        }
        for kk in kk..kc {
            *dst.add(kk * NR + x) = tab[*col.add(kk) as usize];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_impl<const M: usize>(
    a: *const f32,
    lda: usize,
    kc: usize,
    b: *const f32,
    c: &[*mut f32; MR],
    cols: usize,
    first: bool,
    mul: Option<&[f32; NR]>,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let rows: [*const f32; M] = std::array::from_fn(|r| a.add(r * lda));
    let step = |acc: &mut [[__m256; 2]; M], kk: usize| {
        let b0 = _mm256_loadu_ps(b.add(kk * NR));
        let b1 = _mm256_loadu_ps(b.add(kk * NR + 8));
        for (acc, &row) in acc.iter_mut().zip(&rows) {
            let x = _mm256_set1_ps(*row.add(kk));
            acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
        }
    };
    let mut kk = 0;
    while kk + 4 <= kc {
        step(&mut acc, kk);
        step(&mut acc, kk + 1);
        step(&mut acc, kk + 2);
        step(&mut acc, kk + 3);
        kk += 4;
    }
    while kk < kc {
        step(&mut acc, kk);
        kk += 1;
    }
    if cols == NR {
        for (r, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                let p = c[r].add(8 * h);
                let mut v = v;
                if !first {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(p));
                }
                if let Some(m) = mul {
                    v = _mm256_mul_ps(v, _mm256_loadu_ps(m.as_ptr().add(8 * h)));
                }
                _mm256_storeu_ps(p, v);
            }
        }
    } else {
        let mut tmp = [0.0f32; NR];
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(tmp.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[1]);
            for (x, &t) in tmp.iter().enumerate().take(cols) {
                let p = c[r].add(x);
                let mut v = t;
                if !first {
                    v += *p;
                }
                if let Some(m) = mul {
                    v *= m[x];
                }
                *p = v;
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::fp8::decode;

    /// Every non-NaN e4m3fn code through `cvt32_direct`, at each of the 32 positions: exactly
    /// its value times 2^-120, in `DIRECT_ORDER`.
    #[test]
    fn direct_conversion_is_exact_for_every_code() {
        let Some(_) = table() else {
            println!("SKIPPED: direct conversion test (this CPU lacks AVX2/FMA/F16C)");
            return;
        };
        for first in (0..256usize).step_by(32) {
            let codes: [u8; 32] = std::array::from_fn(|i| (first + i) as u8);
            let mut got = [0.0f32; 32];
            // SAFETY: `table()` returned the AVX2 table, so the CPU has AVX2; the loads and
            // stores stay inside `codes` and `got`.
            unsafe { convert(&codes, &mut got) };
            for (slot, &col) in DIRECT_ORDER.iter().enumerate() {
                let want = decode(Format::E4m3fn, codes[col]) as f64;
                if want.is_nan() {
                    continue;
                }
                let got = got[slot] as f64 * 2f64.powi(120);
                assert!(
                    got == want && got.is_sign_negative() == want.is_sign_negative(),
                    "code {:#04x}: {got} instead of {want}",
                    codes[col]
                );
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn convert(codes: &[u8; 32], out: &mut [f32; 32]) {
        let v = cvt32_direct(_mm256_loadu_si256(codes.as_ptr() as *const __m256i));
        for (j, v) in v.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * j), *v);
        }
    }

    /// With MXCSR's flush-to-zero and denormals-are-zero set, as in threads that flush
    /// denormals, subnormal codes still count in both GEMVs, and the caller's MXCSR is back
    /// afterwards.
    #[test]
    fn subnormal_codes_count_when_the_thread_flushes_denormals() {
        let Some(_) = table() else {
            println!("SKIPPED: DAZ test (this CPU lacks AVX2/FMA/F16C)");
            return;
        };
        let (k, n) = (64, 64);
        // Codes 0x01..=0x07 with alternating signs, activations of one sign.
        let w: Vec<u8> = (0..k * n)
            .map(|i| (1 + i % 7) as u8 | ((i % 2) as u8) << 7)
            .collect();
        let x: Vec<f32> = (0..k).map(|i| 1.0 + (i % 5) as f32 * 0.25).collect();
        let value = |q: u8| decode(Format::E4m3fn, q) as f64;
        // NK: column c is w[c*k..]; KN: column c is w[kk*n + c].
        let nk_want: Vec<f64> = (0..n)
            .map(|c| (0..k).map(|kk| x[kk] as f64 * value(w[c * k + kk])).sum())
            .collect();
        let kn_want: Vec<f64> = (0..n)
            .map(|c| (0..k).map(|kk| x[kk] as f64 * value(w[kk * n + c])).sum())
            .collect();
        let saved = mxcsr();
        let flushing = saved | (1 << 6) | (1 << 15);
        // SAFETY: the MXCSR just read with FTZ and DAZ set; restored below.
        unsafe { set_mxcsr(flushing) };
        let mut nk = vec![f32::NAN; n];
        let mut kn = vec![f32::NAN; n];
        Avx2(()).gemv_nk(Format::E4m3fn, &x, 1, k, &w, n, &mut nk, n, Mul::ONE);
        Avx2(()).kn_rows(Format::E4m3fn, &x, k, 1, k, &w, n, &mut kn);
        let after = mxcsr();
        // SAFETY: the MXCSR read at the start.
        unsafe { set_mxcsr(saved) };
        assert_eq!(after, flushing, "the GEMVs must restore the caller's MXCSR");
        // Both return sums in the 2^-8 domain (`E4M3_SCALED`).
        for (what, got, want) in [("NK", &nk, &nk_want), ("KN", &kn, &kn_want)] {
            for (c, (&g, &r)) in got.iter().zip(want.iter()).enumerate() {
                let g = g as f64 * 256.0;
                assert!(
                    r != 0.0 && (g - r).abs() <= 1e-6 * r.abs(),
                    "{what} column {c}: {g} instead of {r}"
                );
            }
        }
    }
}
