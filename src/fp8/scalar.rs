//! Scalar conversions: the reference every vectorized path must equal bit for bit.
use super::{decode_table, Format, Params};
use half::bf16;
use once_cell::sync::Lazy;

static E4M3FN_TABLE: Lazy<[f32; 256]> = Lazy::new(|| decode_table(Format::E4m3fn));
static E5M2_TABLE: Lazy<[f32; 256]> = Lazy::new(|| decode_table(Format::E5m2));

/// The 256 decoded values of `format`, computed once.
pub(super) fn table(format: Format) -> &'static [f32; 256] {
    match format {
        Format::E4m3fn => &E4M3FN_TABLE,
        Format::E5m2 => &E5M2_TABLE,
    }
}

/// `sat(RNE(x))` on the bits of an f32: clamp the magnitude to max, then round to nearest even
/// on the FP8 grid (normal range: add half an ulp minus one plus the kept lsb; subnormal range:
/// the same on the significand shifted down to the subnormal quantum). NaN maps to the
/// format's NaN code with the sign kept.
#[inline(always)]
pub(super) fn encode_bits(p: &Params, bits: u32) -> u8 {
    let sign = (bits >> 24) & 0x80;
    let a = bits & 0x7FFF_FFFF;
    if a > 0x7F80_0000 {
        return (sign | p.nan_code) as u8;
    }
    let a = a.min(p.max_bits);
    let code = if a >= p.min_normal_bits {
        let r = a + p.half_ulp + ((a >> p.shift) & 1);
        (r >> p.shift) - p.rebias
    } else {
        // a < min normal of the format, so its f32 exponent e is at most sub_base - shift_min
        // and `s` below is at least 21; shifting a 24-bit significand by 25 always gives 0.
        let e = a >> 23;
        let mant = (a & 0x007F_FFFF) | 0x0080_0000;
        let s = (p.sub_base - e).min(25);
        let half = (1u32 << (s - 1)) - 1;
        (mant + half + ((mant >> s) & 1)) >> s
    };
    (sign | code) as u8
}

pub(super) fn quantize(p: &Params, scale: f32, src: &[f32], dst: &mut [u8]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = encode_bits(p, (x / scale).to_bits());
    }
}

pub(super) fn quantize_bf16(p: &Params, scale: f32, src: &[bf16], dst: &mut [u8]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = encode_bits(p, (x.to_f32() / scale).to_bits());
    }
}

pub(super) fn dequantize(format: Format, scale: f32, src: &[u8], dst: &mut [f32]) {
    let t = table(format);
    for (d, &c) in dst.iter_mut().zip(src) {
        *d = t[c as usize] * scale;
    }
}

pub(super) fn dequantize_bf16(format: Format, scale: f32, src: &[u8], dst: &mut [bf16]) {
    let t = table(format);
    for (d, &c) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(t[c as usize] * scale);
    }
}

pub(super) fn qdq(p: &Params, scale: f32, src: &[f32], dst: &mut [f32]) {
    let t = table(p.format);
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = t[encode_bits(p, (x / scale).to_bits()) as usize] * scale;
    }
}

pub(super) fn qdq_bf16(p: &Params, scale: f32, src: &[bf16], dst: &mut [bf16]) {
    let t = table(p.format);
    for (d, &x) in dst.iter_mut().zip(src) {
        let q = encode_bits(p, (x.to_f32() / scale).to_bits());
        *d = bf16::from_f32(t[q as usize] * scale);
    }
}
