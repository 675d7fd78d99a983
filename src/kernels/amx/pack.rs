//! Conversions the tile GEMM's packing runs on every value: FP8 codes to bf16 (exact), and
//! float32 to bf16 (round to nearest even) with the remainder split. AVX2 where the CPU has it
//! (every AMX CPU does), else plain loops; both give the same bits (the tests compare them).
use half::bf16;

#[cfg(target_arch = "x86_64")]
use crate::fp8::avx2::{pack16, to_bf16};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::fp8::{decode, Format};

/// `dst[i]` = the bf16 bits of `decode(src[i])` (exact; NaN codes give a NaN).
pub(super) fn codes_to_bf16(fmt: Format, src: &[u8], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "codes_to_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let full = src.len() - src.len() % 16;
        // SAFETY: AVX2/F16C checked; the loop reads and writes 16 elements at `i < full`.
        unsafe {
            match fmt {
                Format::E4m3fn => codes_avx2::<false>(&src[..full], &mut dst[..full]),
                Format::E5m2 => codes_avx2::<true>(&src[..full], &mut dst[..full]),
            }
        }
        codes_scalar(fmt, &src[full..], &mut dst[full..]);
        return;
    }
    codes_scalar(fmt, src, dst)
}

/// `hi[i] = bf16(src[i])`, and with `lo`, `lo[i] = bf16(src[i] - hi[i])` (both to nearest
/// even; NaN stays NaN).
pub(super) fn f32_to_bf16(src: &[f32], hi: &mut [u16], lo: Option<&mut [u16]>) {
    assert_eq!(src.len(), hi.len(), "f32_to_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let full = src.len() - src.len() % 16;
        let (lo_full, lo_tail) = match lo {
            Some(l) => {
                assert_eq!(l.len(), src.len(), "f32_to_bf16: lengths differ");
                let (a, b) = l.split_at_mut(full);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        // SAFETY: AVX2 checked; reads and writes 16 elements at `i < full`.
        unsafe { f32_avx2(&src[..full], &mut hi[..full], lo_full) };
        f32_scalar(&src[full..], &mut hi[full..], lo_tail);
        return;
    }
    f32_scalar(src, hi, lo)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

fn codes_scalar(fmt: Format, src: &[u8], dst: &mut [u16]) {
    for (d, &q) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(decode(fmt, q)).to_bits();
    }
}

fn f32_scalar(src: &[f32], hi: &mut [u16], lo: Option<&mut [u16]>) {
    match lo {
        None => {
            for (h, &x) in hi.iter_mut().zip(src) {
                *h = bf16::from_f32(x).to_bits();
            }
        }
        Some(lo) => {
            for ((h, l), &x) in hi.iter_mut().zip(lo).zip(src) {
                let b = bf16::from_f32(x);
                *h = b.to_bits();
                *l = bf16::from_f32(x - b.to_f32()).to_bits();
            }
        }
    }
}

/// 16 codes a step: widened to float32 by `avx2::cvt16` (e4m3fn as value * 2^-8, so times
/// 2^8 back, exact), then the high half of each float32, which is its bf16 exactly (an FP8
/// value has at most 3 significant bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn codes_avx2<const E5: bool>(src: &[u8], dst: &mut [u16]) {
    let unit = _mm256_set1_ps(if E5 { 1.0 } else { 256.0 });
    let mut i = 0;
    while i + 16 <= src.len() {
        let (a, b) = super::super::avx2::cvt16::<E5>(src.as_ptr().add(i));
        let ha = _mm256_srli_epi32::<16>(_mm256_castps_si256(_mm256_mul_ps(a, unit)));
        let hb = _mm256_srli_epi32::<16>(_mm256_castps_si256(_mm256_mul_ps(b, unit)));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, pack16(ha, hb));
        i += 16;
    }
}

/// 16 floats a step, rounded to bf16 by the FP8 module's `to_bf16` (the bits of
/// `half::bf16::from_f32`), and with `lo` the rounded remainders.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_avx2(src: &[f32], hi: &mut [u16], lo: Option<&mut [u16]>) {
    let mut lo = lo;
    let mut i = 0;
    while i + 16 <= src.len() {
        let x = [
            _mm256_loadu_ps(src.as_ptr().add(i)),
            _mm256_loadu_ps(src.as_ptr().add(i + 8)),
        ];
        let h = [to_bf16(x[0]), to_bf16(x[1])];
        _mm256_storeu_si256(hi.as_mut_ptr().add(i) as *mut __m256i, pack16(h[0], h[1]));
        if let Some(lo) = lo.as_deref_mut() {
            let rest = |j: usize| {
                let back = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h[j]));
                to_bf16(_mm256_sub_ps(x[j], back))
            };
            _mm256_storeu_si256(
                lo.as_mut_ptr().add(i) as *mut __m256i,
                pack16(rest(0), rest(1)),
            );
        }
        i += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_conversions_equal_the_plain_ones() {
        for fmt in [Format::E4m3fn, Format::E5m2] {
            let codes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).chain(0..37).collect();
            let mut got = vec![0u16; codes.len()];
            let mut want = vec![0u16; codes.len()];
            codes_to_bf16(fmt, &codes, &mut got);
            codes_scalar(fmt, &codes, &mut want);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let (gf, wf) = (bf16::from_bits(g), bf16::from_bits(w));
                assert!(
                    g == w || (gf.is_nan() && wf.is_nan()),
                    "{fmt:?} code {:#x}: {g:#x} vs {w:#x}",
                    codes[i]
                );
                let v = decode(fmt, codes[i]);
                assert!(
                    v.is_nan() || wf.to_f32() == v,
                    "{fmt:?} code {:#x} is not exact",
                    codes[i]
                );
            }
        }
        let mut x: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::from_bits(0x3F80_8000), // 1 + 2^-8: a tie, to even (1)
            f32::from_bits(0x3F81_8000), // 1 + 3 * 2^-8: a tie, to even (1 + 2^-6)
            3.4e38,
            -3.4e38,
            1e-40,
            -1e-45,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE,
        ];
        let mut s = 0x9E37_79B9u32;
        for _ in 0..1000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            x.push(f32::from_bits(s));
        }
        let n = x.len();
        let (mut h1, mut l1, mut h2, mut l2) = (vec![0; n], vec![0; n], vec![0; n], vec![0; n]);
        f32_to_bf16(&x, &mut h1, Some(&mut l1));
        f32_scalar(&x, &mut h2, Some(&mut l2));
        let same =
            |a: u16, b: u16| a == b || (bf16::from_bits(a).is_nan() && bf16::from_bits(b).is_nan());
        for i in 0..n {
            assert!(
                same(h1[i], h2[i]),
                "hi of {:e}: {:#x} vs {:#x}",
                x[i],
                h1[i],
                h2[i]
            );
            assert!(
                same(l1[i], l2[i]),
                "lo of {:e}: {:#x} vs {:#x}",
                x[i],
                l1[i],
                l2[i]
            );
        }
        let mut h3 = vec![0; n];
        f32_to_bf16(&x, &mut h3, None);
        assert!(h3.iter().zip(&h2).all(|(&a, &b)| same(a, b)));
    }
}
