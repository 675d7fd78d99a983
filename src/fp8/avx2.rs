//! AVX2 conversions, 8 f32 lanes.
//!
//! Encoding works on the f32 bits: clamp the magnitude, then in the FP8 normal range round to
//! nearest even by adding half an ulp minus one plus the kept lsb (as `scalar::encode_bits`);
//! in the FP8 subnormal range add a magic constant whose ulp is the FP8 quantum, so the FP
//! unit rounds to nearest even (fewer instructions than the scalar variable shift). The QDQ
//! paths keep the rounded value in the f32 domain instead of forming the code. Decoding
//! widens codes to f16 bit patterns (e5m2 is the top byte of an f16; e4m3fn's exponent and
//! mantissa sit in an f16 whose value is 2^-8 of the e4m3fn one) and converts with F16C.
//!
//! Every function here is `unsafe`: callers must have checked that the CPU has AVX2, FMA and
//! F16C, and pass slices of equal length.
use super::{exact_reciprocal, Format, Params};
use half::bf16;
use std::arch::x86_64::*;

/// Broadcast constants of one format.
#[derive(Clone, Copy)]
pub(super) struct Consts {
    abs: __m256i,
    inf: __m256i,
    max: __m256i,
    min_normal: __m256i,
    half_ulp: __m256i,
    keep: __m256i,
    rebias: __m256i,
    one: __m256i,
    nan_code: __m256i,
    shift: __m128i,
    magic: __m256,
    magic_bits: __m256i,
}

impl Consts {
    #[inline(always)]
    unsafe fn new(p: &Params) -> Consts {
        let s = |v: u32| _mm256_set1_epi32(v as i32);
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
            magic: _mm256_set1_ps(p.subnormal_magic()),
            magic_bits: s(p.subnormal_magic().to_bits()),
        }
    }
}

/// The rounding of 8 f32 values to the FP8 grid, before choosing how to express it.
struct Rounded {
    /// f32 sign bits of the input.
    sign: __m256i,
    /// All-ones where the input is NaN.
    nan: __m256i,
    /// All-ones where the clamped magnitude is below the smallest normal of the format.
    sub: __m256i,
    /// Normal range: clamped magnitude bits plus half an ulp minus one plus the kept lsb.
    r: __m256i,
    /// Subnormal range: clamped magnitude plus `magic`: its bits minus those of `magic` are
    /// the code (possibly the smallest normal), its value minus `magic` the rounded value.
    t: __m256,
}

#[inline(always)]
unsafe fn round(c: &Consts, y: __m256) -> Rounded {
    let b = _mm256_castps_si256(y);
    let sign = _mm256_andnot_si256(c.abs, b);
    let a0 = _mm256_and_si256(b, c.abs);
    let nan = _mm256_cmpgt_epi32(a0, c.inf);
    let a = _mm256_min_epu32(a0, c.max);
    let lsb = _mm256_and_si256(_mm256_srl_epi32(a, c.shift), c.one);
    let r = _mm256_add_epi32(_mm256_add_epi32(a, c.half_ulp), lsb);
    // Subnormal range: adding `magic` (whose ulp is the quantum) rounds to nearest even in
    // the FP unit, exactly; f32 subnormals count as zero either way.
    let t = _mm256_add_ps(_mm256_castsi256_ps(a), c.magic);
    let sub = _mm256_cmpgt_epi32(c.min_normal, a);
    Rounded {
        sign,
        nan,
        sub,
        r,
        t,
    }
}

/// FP8 codes (one per 32-bit lane) of 8 f32 values.
#[inline(always)]
unsafe fn code(c: &Consts, y: __m256) -> __m256i {
    let q = round(c, y);
    let normal = _mm256_sub_epi32(_mm256_srl_epi32(q.r, c.shift), c.rebias);
    let m = _mm256_sub_epi32(_mm256_castps_si256(q.t), c.magic_bits);
    let code = _mm256_blendv_epi8(normal, m, q.sub);
    let code = _mm256_blendv_epi8(code, c.nan_code, q.nan);
    _mm256_or_si256(code, _mm256_srli_epi32::<24>(q.sign))
}

/// `decode(encode(y))` of 8 f32 values, as f32.
#[inline(always)]
unsafe fn rounded_value(c: &Consts, y: __m256) -> __m256 {
    let q = round(c, y);
    let normal = _mm256_and_si256(q.r, c.keep);
    let subv = _mm256_castps_si256(_mm256_sub_ps(q.t, c.magic));
    let v = _mm256_or_si256(_mm256_blendv_epi8(normal, subv, q.sub), q.sign);
    _mm256_blendv_ps(_mm256_castsi256_ps(v), y, _mm256_castsi256_ps(q.nan))
}

/// `x / scale`, or `x * (1/scale)` when `MUL` (only used when that is exactly the same).
#[inline(always)]
unsafe fn apply<const MUL: bool>(x: __m256, s: __m256) -> __m256 {
    if MUL {
        _mm256_mul_ps(x, s)
    } else {
        _mm256_div_ps(x, s)
    }
}

/// 8 bf16 (128 bits at `p`) widened exactly to f32.
#[inline(always)]
unsafe fn load_bf16(p: *const bf16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// f32 → bf16 bits (one per 32-bit lane), round to nearest even, NaN kept quiet NaN: the
/// same bits as `half::bf16::from_f32`.
#[inline(always)]
pub(crate) unsafe fn to_bf16(f: __m256) -> __m256i {
    let x = _mm256_castps_si256(f);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
    let r = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb);
    let r = _mm256_srli_epi32::<16>(r);
    let a = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
    let nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F80_0000));
    let nanv = _mm256_or_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x40));
    _mm256_blendv_epi8(r, nanv, nan)
}

/// Packs two vectors of 8 values below 2^16 (32-bit lanes) into 16 u16 in order.
#[inline(always)]
pub(crate) unsafe fn pack16(a: __m256i, b: __m256i) -> __m256i {
    _mm256_permute4x64_epi64::<0xD8>(_mm256_packus_epi32(a, b))
}

/// Stores 16 codes held in two vectors of 32-bit lanes as 16 bytes.
#[inline(always)]
unsafe fn store_codes(d: *mut u8, c0: __m256i, c1: __m256i) {
    let w = pack16(c0, c1);
    let b = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
    _mm_storeu_si128(d as *mut __m128i, b);
}

/// f16 bit patterns (16-bit lanes) of 16 codes (16-bit lanes, values < 256) whose f16 value is
/// the decoded value (e5m2) or 2^-8 times it (e4m3fn; its NaN codes become f16 NaN).
#[inline(always)]
pub(super) unsafe fn half_bits(format: Format, c: __m256i) -> __m256i {
    match format {
        Format::E5m2 => _mm256_slli_epi16::<8>(c),
        Format::E4m3fn => {
            let low7 = _mm256_and_si256(c, _mm256_set1_epi16(0x7F));
            let em = _mm256_slli_epi16::<7>(low7);
            let sign = _mm256_and_si256(_mm256_slli_epi16::<8>(c), _mm256_set1_epi16(-0x8000));
            let nan = _mm256_cmpeq_epi16(low7, _mm256_set1_epi16(0x7F));
            let nan = _mm256_and_si256(nan, _mm256_set1_epi16(0x7C00));
            _mm256_or_si256(_mm256_or_si256(em, sign), nan)
        }
    }
}

/// Factor taking the f16 value of `half_bits` to the decoded value.
#[inline(always)]
pub(super) fn half_factor(format: Format) -> f32 {
    match format {
        Format::E5m2 => 1.0,
        Format::E4m3fn => 256.0,
    }
}

/// 16 decoded values times `scale` from 16 codes at `s`.
#[inline(always)]
unsafe fn decode16(format: Format, fac: __m256, scale: __m256, s: *const u8) -> [__m256; 2] {
    let c = _mm256_cvtepu8_epi16(_mm_loadu_si128(s as *const __m128i));
    let h = half_bits(format, c);
    let f0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    let f1 = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h));
    [
        _mm256_mul_ps(_mm256_mul_ps(f0, fac), scale),
        _mm256_mul_ps(_mm256_mul_ps(f1, fac), scale),
    ]
}

/// # Safety
/// AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize(p: &Params, scale: f32, src: &[f32], dst: &mut [u8]) {
    match exact_reciprocal(scale) {
        Some(r) => quantize_impl::<true>(p, r, src, dst),
        None => quantize_impl::<false>(p, scale, src, dst),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_impl<const MUL: bool>(p: &Params, s: f32, src: &[f32], dst: &mut [u8]) {
    let c = Consts::new(p);
    let sv = _mm256_set1_ps(s);
    in_blocks!(16, src, dst, 0.0f32, 0u8, |s, d| {
        let y0 = apply::<MUL>(_mm256_loadu_ps(s), sv);
        let y1 = apply::<MUL>(_mm256_loadu_ps(s.add(8)), sv);
        store_codes(d, code(&c, y0), code(&c, y1));
    });
}

/// # Safety
/// AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_bf16(p: &Params, scale: f32, src: &[bf16], dst: &mut [u8]) {
    match exact_reciprocal(scale) {
        Some(r) => quantize_bf16_impl::<true>(p, r, src, dst),
        None => quantize_bf16_impl::<false>(p, scale, src, dst),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_bf16_impl<const MUL: bool>(p: &Params, s: f32, src: &[bf16], dst: &mut [u8]) {
    let c = Consts::new(p);
    let sv = _mm256_set1_ps(s);
    in_blocks!(16, src, dst, bf16::ZERO, 0u8, |s, d| {
        let y0 = apply::<MUL>(load_bf16(s), sv);
        let y1 = apply::<MUL>(load_bf16(s.add(8)), sv);
        store_codes(d, code(&c, y0), code(&c, y1));
    });
}

/// # Safety
/// AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize(format: Format, scale: f32, src: &[u8], dst: &mut [f32]) {
    let fac = _mm256_set1_ps(half_factor(format));
    let sv = _mm256_set1_ps(scale);
    in_blocks!(16, src, dst, 0u8, 0.0f32, |s, d| {
        let [f0, f1] = decode16(format, fac, sv, s);
        _mm256_storeu_ps(d, f0);
        _mm256_storeu_ps(d.add(8), f1);
    });
}

/// # Safety
/// AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize_bf16(format: Format, scale: f32, src: &[u8], dst: &mut [bf16]) {
    let fac = _mm256_set1_ps(half_factor(format));
    let sv = _mm256_set1_ps(scale);
    in_blocks!(16, src, dst, 0u8, bf16::ZERO, |s, d| {
        let [f0, f1] = decode16(format, fac, sv, s);
        _mm256_storeu_si256(d as *mut __m256i, pack16(to_bf16(f0), to_bf16(f1)));
    });
}

/// # Safety
/// AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn qdq(p: &Params, scale: f32, src: &[f32], dst: &mut [f32]) {
    match exact_reciprocal(scale) {
        Some(r) => qdq_impl::<true>(p, r, scale, src, dst),
        None => qdq_impl::<false>(p, scale, scale, src, dst),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qdq_impl<const MUL: bool>(p: &Params, s: f32, scale: f32, src: &[f32], dst: &mut [f32]) {
    let c = Consts::new(p);
    let sv = _mm256_set1_ps(s);
    let scale = _mm256_set1_ps(scale);
    in_blocks!(16, src, dst, 0.0f32, 0.0f32, |s, d| {
        let y0 = apply::<MUL>(_mm256_loadu_ps(s), sv);
        let y1 = apply::<MUL>(_mm256_loadu_ps(s.add(8)), sv);
        _mm256_storeu_ps(d, _mm256_mul_ps(rounded_value(&c, y0), scale));
        _mm256_storeu_ps(d.add(8), _mm256_mul_ps(rounded_value(&c, y1), scale));
    });
}

/// # Safety
/// AVX2, FMA and F16C present; `src.len() == dst.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn qdq_bf16(p: &Params, scale: f32, src: &[bf16], dst: &mut [bf16]) {
    match exact_reciprocal(scale) {
        Some(r) => qdq_bf16_impl::<true>(p, r, scale, src, dst),
        None => qdq_bf16_impl::<false>(p, scale, scale, src, dst),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qdq_bf16_impl<const MUL: bool>(
    p: &Params,
    s: f32,
    scale: f32,
    src: &[bf16],
    dst: &mut [bf16],
) {
    let c = Consts::new(p);
    let sv = _mm256_set1_ps(s);
    let scale = _mm256_set1_ps(scale);
    in_blocks!(16, src, dst, bf16::ZERO, bf16::ZERO, |s, d| {
        let y0 = apply::<MUL>(load_bf16(s), sv);
        let y1 = apply::<MUL>(load_bf16(s.add(8)), sv);
        let v0 = _mm256_mul_ps(rounded_value(&c, y0), scale);
        let v1 = _mm256_mul_ps(rounded_value(&c, y1), scale);
        _mm256_storeu_si256(d as *mut __m256i, pack16(to_bf16(v0), to_bf16(v1)));
    });
}
