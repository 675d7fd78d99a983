//! `fp8xla_quantize_rows`: FP8 codes of each row (the last dimension) of a float32 tensor,
//! each row with its own scale `amax(row) / max(format)` (over the row's finite values; 1 for
//! a row of zeros), and the scales.
//!
//! Made for the FP8 KV cache ([`crate::rewrite::kv_cache`]): every position (and head) of the
//! cache is one row of `head_dim` values, quantized when it is written; the attention products
//! read the codes and apply the row scales on their small side. Contract:
//! docs/custom-calls.md.
use super::act_quant::row_scale;
use super::{fp8_format, par_map};
use crate::fp8::{self, Format};
use crate::xla_ffi::{Call, DataType, FfiError};

/// The `fp8xla_quantize_rows` custom call: `x[..., k]` → `(q[..., k], scales[...])`.
pub fn quantize_rows(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[1], 2)?;
    call.attrs().reject_unknown(&[])?;
    let x = call.arg(0)?;
    if x.dtype() != DataType::F32 {
        return Err(FfiError::invalid(format!(
            "operand 0 (x): expected dtype float32, got {}",
            x.dtype().name()
        )));
    }
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        return Err(FfiError::invalid(
            "operand 0 (x): expected rank at least 1 (rows along the last dim), got a scalar"
                .to_string(),
        ));
    };
    let q = call.take_ret(0)?;
    let format = fp8_format("result 0 (q)", q.dtype())?;
    super::check_same_shape("result 0 (q)", q.dims(), "operand 0 (x)", dims)?;
    let s = call.take_ret(1)?;
    if s.dtype() != DataType::F32 {
        return Err(FfiError::invalid(format!(
            "result 1 (scales): expected dtype float32, got {}",
            s.dtype().name()
        )));
    }
    if s.dims() != lead {
        return Err(FfiError::invalid(format!(
            "result 1 (scales): expected shape {lead:?} (operand 0's dims without the last), \
             got {:?}",
            s.dims()
        )));
    }
    let src = x.slice::<f32>("operand 0 (x)")?;
    let codes = q.into_slice::<u8>("result 0 (q)")?;
    let scales = s.into_slice::<f32>("result 1 (scales)")?;
    quantize_rows_into(call.pool(), format, k as usize, src, codes, scales);
    Ok(())
}

/// Quantizes the rows of `k` values of `src` into `codes`, one scale each into `scales`.
/// With `k == 0` there are no values and every row's scale is 1.
pub(crate) fn quantize_rows_into(
    pool: &dyn crate::parallel::Parallel,
    format: Format,
    k: usize,
    src: &[f32],
    codes: &mut [u8],
    scales: &mut [f32],
) {
    if k == 0 {
        scales.fill(1.0);
        return;
    }
    debug_assert_eq!(src.len(), scales.len() * k);
    // The scales first (a cheap pass), then the codes.
    for (s, row) in scales.iter_mut().zip(src.chunks_exact(k)) {
        *s = row_scale(format, row);
    }
    let scales: &[f32] = scales;
    // par_map hands out chunks of any length: each finds its place in `src` (and so its
    // rows) from its address.
    let base = src.as_ptr() as usize;
    par_map(pool, src, codes, |s, d| {
        let first = (s.as_ptr() as usize - base) / std::mem::size_of::<f32>();
        let mut i = 0;
        while i < s.len() {
            let at = first + i;
            let n = (k - at % k).min(s.len() - i);
            fp8::quantize(format, scales[at / k], &s[i..i + n], &mut d[i..i + n]);
            i += n;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::decode;
    use crate::parallel::Serial;

    /// Independent reference: the nearest FP8 value of `v` by search over all codes (ties to
    /// the even code, i.e. the one with a zero last mantissa bit), after saturation.
    fn nearest(format: Format, v: f64) -> u8 {
        if v.is_nan() {
            return 0x7f;
        }
        let v = v.clamp(-(format.max() as f64), format.max() as f64);
        let mut best: Option<(f64, u8)> = None;
        for c in 0..=255u8 {
            let d = decode(format, c) as f64;
            if !d.is_finite() || (d == 0.0 && c & 0x80 != 0) {
                continue;
            }
            let e = (d - v).abs();
            match best {
                Some((be, bc)) if e > be || (e == be && (bc & 1) == 0) => {}
                _ => best = Some((e, c)),
            }
        }
        let c = best.unwrap().1;
        // The sign of zero follows the value's sign.
        if decode(format, c) == 0.0 && v.is_sign_negative() {
            c | 0x80
        } else {
            c
        }
    }

    #[test]
    fn parallel_chunks_that_split_rows_give_the_serial_result() {
        // 91 700 values (past the parallel threshold) in rows of an odd 131: chunks of any
        // length start and end inside rows.
        let (rows, k) = (700, 131);
        let src: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919) % 1013) as f32 * if i % 3 == 0 { -0.37 } else { 1.9 })
            .collect();
        let run = |par: &dyn crate::parallel::Parallel| {
            let mut codes = vec![0u8; rows * k];
            let mut scales = vec![0f32; rows];
            quantize_rows_into(par, Format::E4m3fn, k, &src, &mut codes, &mut scales);
            (codes, scales)
        };
        let serial = run(&Serial);
        assert_eq!(run(&crate::parallel::ScopedThreads(3)), serial);
        // and each row's codes are that row quantized with its own scale
        for r in [0, 1, 350, rows - 1] {
            let mut want = vec![0u8; k];
            fp8::quantize(
                Format::E4m3fn,
                serial.1[r],
                &src[r * k..(r + 1) * k],
                &mut want,
            );
            assert_eq!(&serial.0[r * k..(r + 1) * k], &want[..]);
        }
    }

    #[test]
    fn each_row_matches_a_search_reference() {
        let mut seed = 11u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        for format in [Format::E4m3fn, Format::E5m2] {
            for (rows, k) in [(0, 5), (1, 1), (3, 7), (5, 33), (2, 0)] {
                let mut src: Vec<f32> =
                    (0..rows * k).map(|i| rand() * (1 + i % 9) as f32).collect();
                if rows * k > 8 {
                    src[2] = f32::NAN;
                    src[4] = f32::INFINITY;
                    src[k] = 0.0;
                }
                let mut codes = vec![0xAAu8; rows * k];
                let mut scales = vec![f32::NAN; rows];
                quantize_rows_into(&Serial, format, k, &src, &mut codes, &mut scales);
                for r in 0..rows {
                    let row = &src[r * k..(r + 1) * k];
                    let amax = row
                        .iter()
                        .filter(|x| x.is_finite())
                        .fold(0f64, |m, &x| m.max((x as f64).abs()));
                    let want_scale = if amax > 0.0 {
                        (amax as f32) / format.max()
                    } else {
                        1.0
                    };
                    assert_eq!(scales[r], want_scale, "{format:?} row {r}");
                    for (i, &x) in row.iter().enumerate() {
                        let q = x / want_scale; // IEEE f32 division, as the contract says
                        let want = nearest(format, q as f64);
                        let got = codes[r * k + i];
                        if x.is_nan() {
                            assert!(decode(format, got).is_nan());
                        } else {
                            assert_eq!(got, want, "{format:?} row {r} elem {i}: {x}");
                        }
                    }
                }
                if k == 0 {
                    assert!(scales.iter().all(|&s| s == 1.0));
                }
            }
        }
    }
}
