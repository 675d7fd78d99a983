//! FP8 formats e4m3fn and e5m2: scalar and vectorized conversions.
//!
//! Semantics follow `ml_dtypes` bit for bit. Quantization is `q = sat(RNE(x / scale))`: the
//! division is an IEEE f32 division (the vector paths multiply by the reciprocal only when
//! `scale` is a power of two, where that gives the same bits), values are clamped to ±max of
//! the format before rounding, NaN stays NaN. Dequantization is `decode(q) * scale`.
//!
//! The rounding to FP8 and to bf16 is integer work on the bits, or (FP8 subnormals in the
//! vector paths) one f32 addition that is exact under round-to-nearest with or without
//! flush-to-zero; the division and the multiply by `scale` depend on the environment. Under
//! flush-to-zero / denormals-are-zero (as some hosts set on their worker threads), results
//! differ from the IEEE ones only where an f32 input, `scale` or a dequantized product is
//! subnormal (|scale| below about 2^-100 for dequantization).
//!
//! Every conversion has a scalar reference and AVX2 / AVX-512 versions that equal it bit for
//! bit (NaN payloads aside); the plain functions pick the path from [`Isa::detect`], the
//! `*_with` functions take it explicitly (an `isa` the CPU lacks is lowered to one it has).

use crate::cpu::Isa;
use half::bf16;

/// Runs `$body` over `$src`/`$dst` in blocks of `$n` elements, `$s`/`$d` bound to raw
/// pointers to the block; the last partial block goes through zero-padded stack buffers, so
/// a vector body that reads and writes exactly `$n` elements never leaves the slices.
/// Must be expanded inside an `unsafe fn` whose slices have equal lengths.
#[cfg(target_arch = "x86_64")]
macro_rules! in_blocks {
    ($n:literal, $src:expr, $dst:expr, $zs:expr, $zd:expr, |$s:ident, $d:ident| $body:block) => {{
        let (src, dst) = ($src, $dst);
        let len = src.len();
        debug_assert_eq!(len, dst.len());
        let full = len - len % $n;
        let mut i = 0;
        while i < full {
            let $s = src.as_ptr().add(i);
            let $d = dst.as_mut_ptr().add(i);
            $body
            i += $n;
        }
        if full < len {
            let rem = len - full;
            let mut sbuf = [$zs; $n];
            let mut dbuf = [$zd; $n];
            sbuf[..rem].copy_from_slice(&src[full..]);
            {
                let $s = sbuf.as_ptr();
                let $d = dbuf.as_mut_ptr();
                $body
            }
            dst[full..].copy_from_slice(&dbuf[..rem]);
        }
    }};
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

/// The two FP8 formats fp8xla computes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// 4 exponent bits (bias 7), 3 mantissa bits, no infinity, NaN = 0x7F/0xFF, max 448.
    E4m3fn,
    /// 5 exponent bits (bias 15), 2 mantissa bits, IEEE-like with infinities, max 57344.
    E5m2,
}

impl Format {
    /// Largest finite value.
    pub fn max(self) -> f32 {
        match self {
            Format::E4m3fn => 448.0,
            Format::E5m2 => 57344.0,
        }
    }

    /// Name as used in attributes and in Python (`"e4m3fn"` / `"e5m2"`).
    pub fn name(self) -> &'static str {
        match self {
            Format::E4m3fn => "e4m3fn",
            Format::E5m2 => "e5m2",
        }
    }

    /// Parses the names accepted in attributes: `e4m3fn`/`e5m2`, also INC's `fp8_e4m3` and
    /// `fp8_e5m2` (INC's e4m3 is e4m3fn).
    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "e4m3fn" | "f8e4m3fn" | "float8_e4m3fn" | "fp8_e4m3" => Some(Format::E4m3fn),
            "e5m2" | "f8e5m2" | "float8_e5m2" | "fp8_e5m2" => Some(Format::E5m2),
            _ => None,
        }
    }

    /// Exponent bias and mantissa width.
    fn layout(self) -> (i32, u32) {
        match self {
            Format::E4m3fn => (7, 3),
            Format::E5m2 => (15, 2),
        }
    }
}

/// Exact value of an FP8 code.
pub fn decode(format: Format, code: u8) -> f32 {
    let (bias, mbits) = format.layout();
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((code & 0x7F) >> mbits) as i32;
    let man = (code & ((1 << mbits) - 1)) as i32;
    let emax = (1 << (7 - mbits)) - 1;
    match format {
        Format::E4m3fn if exp == emax && man == (1 << mbits) - 1 => return f32::NAN,
        Format::E5m2 if exp == emax => {
            return if man == 0 {
                sign * f32::INFINITY
            } else {
                f32::NAN
            };
        }
        _ => {}
    }
    let magnitude = if exp == 0 {
        man as f32 * (2.0f32).powi(1 - bias - mbits as i32)
    } else {
        (1.0 + man as f32 / (1 << mbits) as f32) * (2.0f32).powi(exp - bias)
    };
    sign * magnitude
}

/// The 256 decoded values of a format, for table-driven kernels.
pub fn decode_table(format: Format) -> [f32; 256] {
    std::array::from_fn(|c| decode(format, c as u8))
}

/// Per-format constants of the f32 → FP8 rounding, shared by the scalar and vector paths.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Params {
    pub(crate) format: Format,
    /// f32 bits of the largest finite value.
    pub(crate) max_bits: u32,
    /// f32 bits of the smallest normal value.
    pub(crate) min_normal_bits: u32,
    /// 23 - mantissa bits: how many f32 mantissa bits rounding drops in the normal range.
    pub(crate) shift: u32,
    /// Half an FP8 ulp minus one, in f32 mantissa units (normal range).
    pub(crate) half_ulp: u32,
    /// Mask keeping the f32 bits that survive rounding in the normal range.
    pub(crate) keep_mask: u32,
    /// `(127 - bias) << mantissa bits`: turns a shifted f32 exponent/mantissa into the code.
    pub(crate) rebias: u32,
    /// `151 - bias - mantissa bits`: subnormal right shift of the 24-bit significand is
    /// `sub_base - f32 exponent field`.
    pub(crate) sub_base: u32,
    /// Code of NaN (without sign).
    pub(crate) nan_code: u32,
    /// Value of the smallest subnormal, `2^(1 - bias - mantissa bits)`.
    pub(crate) quantum: f32,
}

impl Params {
    pub(crate) fn new(format: Format) -> Params {
        let (bias, mbits) = format.layout();
        let shift = 23 - mbits;
        Params {
            format,
            max_bits: format.max().to_bits(),
            min_normal_bits: ((127 + 1 - bias) as u32) << 23,
            shift,
            half_ulp: (1 << (shift - 1)) - 1,
            keep_mask: !((1u32 << shift) - 1),
            rebias: ((127 - bias) as u32) << mbits,
            sub_base: (151 - bias) as u32 - mbits,
            nan_code: match format {
                Format::E4m3fn => 0x7F,
                Format::E5m2 => 0x7E,
            },
            quantum: f32::from_bits(((127 + 1 - bias - mbits as i32) as u32) << 23),
        }
    }
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Params {
    /// `quantum * 2^23`: for `0 <= v < ` min normal, `v + magic` rounds `v` to the nearest
    /// even multiple of the quantum (the ulp of `magic`), with the multiple in its low bits.
    pub(crate) fn subnormal_magic(&self) -> f32 {
        self.quantum * 8_388_608.0
    }
}

/// The reciprocal of `scale` when multiplying by it is exactly the same as dividing by `scale`
/// for every f32 `x`: `scale` a normal power of two, so `1/scale` is exact and `x * (1/scale)`
/// rounds the same real number as `x / scale`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn exact_reciprocal(scale: f32) -> Option<f32> {
    let bits = scale.to_bits();
    let exp = (bits >> 23) & 0xFF;
    (bits & 0x007F_FFFF == 0 && (1..=254).contains(&exp)).then(|| 1.0 / scale)
}

/// The path actually taken for a requested `isa`: never above what this CPU supports, and
/// the AVX-512 conversions at the AMX level (AMX has no conversion instructions of its own).
fn effective(isa: Isa) -> Isa {
    isa.min(Isa::supported()).min(Isa::Avx512)
}

/// `sat(RNE(x))`: the FP8 code nearest to `x` (ties to even), `x` clamped to ±max first so
/// ±infinity gives ±max; ±0 keeps its sign; NaN gives a NaN code.
pub fn encode(format: Format, x: f32) -> u8 {
    scalar::encode_bits(&Params::new(format), x.to_bits())
}

/// `dst[i] = sat(RNE(src[i] / scale))` with an IEEE f32 division.
pub fn quantize(format: Format, scale: f32, src: &[f32], dst: &mut [u8]) {
    quantize_with(Isa::detect(), format, scale, src, dst)
}

/// As [`quantize`] on bf16 input (converted to f32 exactly first).
pub fn quantize_bf16(format: Format, scale: f32, src: &[bf16], dst: &mut [u8]) {
    quantize_bf16_with(Isa::detect(), format, scale, src, dst)
}

/// `dst[i] = decode(src[i]) * scale` (one f32 multiply).
pub fn dequantize(format: Format, scale: f32, src: &[u8], dst: &mut [f32]) {
    dequantize_with(Isa::detect(), format, scale, src, dst)
}

/// As [`dequantize`], the f32 product rounded to bf16 to nearest even.
pub fn dequantize_bf16(format: Format, scale: f32, src: &[u8], dst: &mut [bf16]) {
    dequantize_bf16_with(Isa::detect(), format, scale, src, dst)
}

/// `dequantize(quantize(x))` in one pass.
pub fn qdq(format: Format, scale: f32, src: &[f32], dst: &mut [f32]) {
    qdq_with(Isa::detect(), format, scale, src, dst)
}

/// `dequantize_bf16(quantize_bf16(x))` in one pass.
pub fn qdq_bf16(format: Format, scale: f32, src: &[bf16], dst: &mut [bf16]) {
    qdq_bf16_with(Isa::detect(), format, scale, src, dst)
}

/// [`quantize`] on the given path.
pub fn quantize_with(isa: Isa, format: Format, scale: f32, src: &[f32], dst: &mut [u8]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "fp8::quantize: src and dst lengths differ"
    );
    let p = Params::new(format);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx512 when the CPU has AVX-512 F/BW/VL + AVX2/FMA/F16C.
        Isa::Avx512 => unsafe { avx512::quantize(&p, scale, src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx2 when the CPU has AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { avx2::quantize(&p, scale, src, dst) },
        _ => scalar::quantize(&p, scale, src, dst),
    }
}

/// [`quantize_bf16`] on the given path.
pub fn quantize_bf16_with(isa: Isa, format: Format, scale: f32, src: &[bf16], dst: &mut [u8]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "fp8::quantize_bf16: src and dst lengths differ"
    );
    let p = Params::new(format);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx512 when the CPU has AVX-512 F/BW/VL + AVX2/FMA/F16C.
        Isa::Avx512 => unsafe { avx512::quantize_bf16(&p, scale, src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx2 when the CPU has AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { avx2::quantize_bf16(&p, scale, src, dst) },
        _ => scalar::quantize_bf16(&p, scale, src, dst),
    }
}

/// [`dequantize`] on the given path.
pub fn dequantize_with(isa: Isa, format: Format, scale: f32, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "fp8::dequantize: src and dst lengths differ"
    );
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx512 when the CPU has AVX-512 F/BW/VL + AVX2/FMA/F16C.
        Isa::Avx512 => unsafe { avx512::dequantize(format, scale, src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx2 when the CPU has AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { avx2::dequantize(format, scale, src, dst) },
        _ => scalar::dequantize(format, scale, src, dst),
    }
}

/// [`dequantize_bf16`] on the given path.
pub fn dequantize_bf16_with(isa: Isa, format: Format, scale: f32, src: &[u8], dst: &mut [bf16]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "fp8::dequantize_bf16: src and dst lengths differ"
    );
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx512 when the CPU has AVX-512 F/BW/VL + AVX2/FMA/F16C.
        Isa::Avx512 => unsafe { avx512::dequantize_bf16(format, scale, src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx2 when the CPU has AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { avx2::dequantize_bf16(format, scale, src, dst) },
        _ => scalar::dequantize_bf16(format, scale, src, dst),
    }
}

/// [`qdq`] on the given path.
pub fn qdq_with(isa: Isa, format: Format, scale: f32, src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "fp8::qdq: src and dst lengths differ");
    let p = Params::new(format);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx512 when the CPU has AVX-512 F/BW/VL + AVX2/FMA/F16C.
        Isa::Avx512 => unsafe { avx512::qdq(&p, scale, src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx2 when the CPU has AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { avx2::qdq(&p, scale, src, dst) },
        _ => scalar::qdq(&p, scale, src, dst),
    }
}

/// [`qdq_bf16`] on the given path.
pub fn qdq_bf16_with(isa: Isa, format: Format, scale: f32, src: &[bf16], dst: &mut [bf16]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "fp8::qdq_bf16: src and dst lengths differ"
    );
    let p = Params::new(format);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx512 when the CPU has AVX-512 F/BW/VL + AVX2/FMA/F16C.
        Isa::Avx512 => unsafe { avx512::qdq_bf16(&p, scale, src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` only returns Avx2 when the CPU has AVX2, FMA and F16C.
        Isa::Avx2 => unsafe { avx2::qdq_bf16(&p, scale, src, dst) },
        _ => scalar::qdq_bf16(&p, scale, src, dst),
    }
}

#[cfg(test)]
mod tests;
