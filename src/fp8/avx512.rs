//! AVX-512 conversions, 16 f32 lanes: the algorithm of `avx2.rs` with mask registers for the
//! lane selections and down-converting stores (`vpmovdb`, `vpmovdw`) for the narrow outputs.
//!
//! Every function here is `unsafe`: callers must have checked that the CPU has AVX-512 F, BW
//! and VL besides AVX2, FMA and F16C, and pass slices of equal length.
//!
//! The AVX-512 intrinsics are stable since Rust 1.89 (the crate's `rust-version`).
use super::avx2::{half_bits, half_factor};
use super::{exact_reciprocal, Format, Params};
use half::bf16;
use std::arch::x86_64::*;

/// Broadcast constants of one format.
#[derive(Clone, Copy)]
struct Consts {
    abs: __m512i,
    inf: __m512i,
    max: __m512i,
    min_normal: __m512i,
    half_ulp: __m512i,
    keep: __m512i,
    rebias: __m512i,
    one: __m512i,
    nan_code: __m512i,
    shift: __m128i,
    magic: __m512,
    magic_bits: __m512i,
}

impl Consts {
    #[inline(always)]
    unsafe fn new(p: &Params) -> Consts {
        let s = |v: u32| _mm512_set1_epi32(v as i32);
        Consts {
            abs: s(0x7FFF_FFFF),
            inf: s(0x7F80_0000),
            max: s(p.max_bits),
            min_normal: s(p.min_normal_bits),
            half_ulp: s(p.half_ulp),
            keep: s(p.keep_mask),
            rebias: s(p.rebias),
            one: s(1),
            nan_code: s(p.nan_code),
            shift: _mm_cvtsi32_si128(p.shift as i32),
            magic: _mm512_set1_ps(p.subnormal_magic()),
            magic_bits: s(p.subnormal_magic().to_bits()),
        }
    }
}

/// The rounding of 16 f32 values to the FP8 grid (see `avx2::Rounded`).
struct Rounded {
    sign: __m512i,
    nan: __mmask16,
    sub: __mmask16,
    r: __m512i,
    t: __m512,
}

#[inline(always)]
unsafe fn round(c: &Consts, y: __m512) -> Rounded {
    let b = _mm512_castps_si512(y);
    let sign = _mm512_andnot_si512(c.abs, b);
    let a0 = _mm512_and_si512(b, c.abs);
    let nan = _mm512_cmpgt_epu32_mask(a0, c.inf);
    let a = _mm512_min_epu32(a0, c.max);
    let lsb = _mm512_and_si512(_mm512_srl_epi32(a, c.shift), c.one);
    let r = _mm512_add_epi32(_mm512_add_epi32(a, c.half_ulp), lsb);
    // Subnormal range: adding `magic` (whose ulp is the quantum) rounds to nearest even in
    // the FP unit, exactly; f32 subnormals count as zero either way.
    let t = _mm512_add_ps(_mm512_castsi512_ps(a), c.magic);
    let sub = _mm512_cmplt_epu32_mask(a, c.min_normal);
    Rounded {
        sign,
        nan,
        sub,
        r,
        t,
    }
}

/// FP8 codes (one per 32-bit lane) of 16 f32 values.
#[inline(always)]
unsafe fn code(c: &Consts, y: __m512) -> __m512i {
    let q = round(c, y);
    let normal = _mm512_sub_epi32(_mm512_srl_epi32(q.r, c.shift), c.rebias);
    let m = _mm512_sub_epi32(_mm512_castps_si512(q.t), c.magic_bits);
    let code = _mm512_mask_blend_epi32(q.sub, normal, m);
    let code = _mm512_mask_blend_epi32(q.nan, code, c.nan_code);
    _mm512_or_si512(code, _mm512_srli_epi32::<24>(q.sign))
}

/// `decode(encode(y))` of 16 f32 values, as f32.
#[inline(always)]
unsafe fn rounded_value(c: &Consts, y: __m512) -> __m512 {
    let q = round(c, y);
    let normal = _mm512_and_si512(q.r, c.keep);
    let subv = _mm512_castps_si512(_mm512_sub_ps(q.t, c.magic));
    let v = _mm512_or_si512(_mm512_mask_blend_epi32(q.sub, normal, subv), q.sign);
    _mm512_mask_blend_ps(q.nan, _mm512_castsi512_ps(v), y)
}

/// `x / scale`, or `x * (1/scale)` when `MUL` (only used when that is exactly the same).
#[inline(always)]
unsafe fn apply<const MUL: bool>(x: __m512, s: __m512) -> __m512 {
    if MUL {
        _mm512_mul_ps(x, s)
    } else {
        _mm512_div_ps(x, s)
    }
}

/// 16 bf16 (256 bits at `p`) widened exactly to f32.
#[inline(always)]
unsafe fn load_bf16(p: *const bf16) -> __m512 {
    let h = _mm256_loadu_si256(p as *const __m256i);
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// f32 → bf16 bits (one per 32-bit lane), as `avx2::to_bf16`.
#[inline(always)]
unsafe fn to_bf16(f: __m512) -> __m512i {
    let x = _mm512_castps_si512(f);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb);
    let r = _mm512_srli_epi32::<16>(r);
    let a = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF));
    let nan = _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F80_0000));
    let nanv = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x40));
    _mm512_mask_blend_epi32(nan, r, nanv)
}

/// Stores 16 values below 2^16 held in 32-bit lanes as 16 u16.
#[inline(always)]
unsafe fn store_u16(d: *mut bf16, v: __m512i) {
    _mm256_storeu_si256(d as *mut __m256i, _mm512_cvtepi32_epi16(v));
}

/// 16 decoded values times `scale` from 16 codes at `s`.
#[inline(always)]
unsafe fn decode16(format: Format, fac: __m512, scale: __m512, s: *const u8) -> __m512 {
    let c = _mm256_cvtepu8_epi16(_mm_loadu_si128(s as *const __m128i));
    let f = _mm512_cvtph_ps(half_bits(format, c));
    _mm512_mul_ps(_mm512_mul_ps(f, fac), scale)
}

/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn quantize(p: &Params, scale: f32, src: &[f32], dst: &mut [u8]) {
    match exact_reciprocal(scale) {
        Some(r) => quantize_impl::<true>(p, r, src, dst),
        None => quantize_impl::<false>(p, scale, src, dst),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn quantize_impl<const MUL: bool>(p: &Params, s: f32, src: &[f32], dst: &mut [u8]) {
    let c = Consts::new(p);
    let sv = _mm512_set1_ps(s);
    in_blocks!(16, src, dst, 0.0f32, 0u8, |s, d| {
        let y = apply::<MUL>(_mm512_loadu_ps(s), sv);
        _mm_storeu_si128(d as *mut __m128i, _mm512_cvtepi32_epi8(code(&c, y)));
    });
}

/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn quantize_bf16(p: &Params, scale: f32, src: &[bf16], dst: &mut [u8]) {
    match exact_reciprocal(scale) {
        Some(r) => quantize_bf16_impl::<true>(p, r, src, dst),
        None => quantize_bf16_impl::<false>(p, scale, src, dst),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn quantize_bf16_impl<const MUL: bool>(p: &Params, s: f32, src: &[bf16], dst: &mut [u8]) {
    let c = Consts::new(p);
    let sv = _mm512_set1_ps(s);
    in_blocks!(16, src, dst, bf16::ZERO, 0u8, |s, d| {
        let y = apply::<MUL>(load_bf16(s), sv);
        _mm_storeu_si128(d as *mut __m128i, _mm512_cvtepi32_epi8(code(&c, y)));
    });
}

/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn dequantize(format: Format, scale: f32, src: &[u8], dst: &mut [f32]) {
    let fac = _mm512_set1_ps(half_factor(format));
    let sv = _mm512_set1_ps(scale);
    in_blocks!(16, src, dst, 0u8, 0.0f32, |s, d| {
        _mm512_storeu_ps(d, decode16(format, fac, sv, s));
    });
}

/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn dequantize_bf16(format: Format, scale: f32, src: &[u8], dst: &mut [bf16]) {
    let fac = _mm512_set1_ps(half_factor(format));
    let sv = _mm512_set1_ps(scale);
    in_blocks!(16, src, dst, 0u8, bf16::ZERO, |s, d| {
        store_u16(d, to_bf16(decode16(format, fac, sv, s)));
    });
}

/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn qdq(p: &Params, scale: f32, src: &[f32], dst: &mut [f32]) {
    match exact_reciprocal(scale) {
        Some(r) => qdq_impl::<true>(p, r, scale, src, dst),
        None => qdq_impl::<false>(p, scale, scale, src, dst),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn qdq_impl<const MUL: bool>(p: &Params, s: f32, scale: f32, src: &[f32], dst: &mut [f32]) {
    let c = Consts::new(p);
    let sv = _mm512_set1_ps(s);
    let scale = _mm512_set1_ps(scale);
    in_blocks!(16, src, dst, 0.0f32, 0.0f32, |s, d| {
        let y = apply::<MUL>(_mm512_loadu_ps(s), sv);
        _mm512_storeu_ps(d, _mm512_mul_ps(rounded_value(&c, y), scale));
    });
}

/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn qdq_bf16(p: &Params, scale: f32, src: &[bf16], dst: &mut [bf16]) {
    match exact_reciprocal(scale) {
        Some(r) => qdq_bf16_impl::<true>(p, r, scale, src, dst),
        None => qdq_bf16_impl::<false>(p, scale, scale, src, dst),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn qdq_bf16_impl<const MUL: bool>(
    p: &Params,
    s: f32,
    scale: f32,
    src: &[bf16],
    dst: &mut [bf16],
) {
    let c = Consts::new(p);
    let sv = _mm512_set1_ps(s);
    let scale = _mm512_set1_ps(scale);
    in_blocks!(16, src, dst, bf16::ZERO, bf16::ZERO, |s, d| {
        let y = apply::<MUL>(load_bf16(s), sv);
        store_u16(d, to_bf16(_mm512_mul_ps(rounded_value(&c, y), scale)));
    });
}
