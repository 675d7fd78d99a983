//! Dynamic activation quantization for `fp8xla_matmul` (attribute `a_dynamic`): each row of
//! the packed activation panel (one token's `k` inputs) is quantized to FP8 and back with its
//! own scale, computed at run time as `amax(row) / max(format)` (INC's scale, per token).
//!
//! Infinities and NaN do not enter a row's amax (they go through the QDQ as `fp8::qdq` maps
//! them: NaN stays NaN, ±inf saturates), so one bad value does not flush the rest of its row
//! to zero. A row of zeros gets scale 1.
use crate::fp8::{self, Format};

/// The run-time scale of one row: `amax / max`, over its finite values; 1 if that is 0.
pub(crate) fn row_scale(format: Format, row: &[f32]) -> f32 {
    let amax = row
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f32, |m, x| m.max(x.abs()));
    let s = amax / format.max();
    if s > 0.0 && s.is_finite() {
        s
    } else {
        1.0
    }
}

/// `dst = qdq(src)` row by row (rows of `k` values), each row with its own [`row_scale`].
pub(crate) fn qdq_rows(format: Format, k: usize, src: &[f32], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    if k == 0 {
        return;
    }
    for (s, d) in src.chunks_exact(k).zip(dst.chunks_exact_mut(k)) {
        fp8::qdq(format, row_scale(format, s), s, d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_gets_its_own_amax_scale() {
        let src = [
            1.0,
            -448.0,
            2.0,
            0.5,
            0.0,
            0.0,
            f32::NAN,
            3.0,
            f32::INFINITY,
        ];
        let mut dst = [0f32; 9];
        qdq_rows(Format::E4m3fn, 3, &src, &mut dst);
        // row 0: scale 1, values on the grid stay
        assert_eq!(&dst[..3], &[1.0, -448.0, 2.0]);
        // row 1: amax 0.5, so 0.5 maps to 448 and back exactly; zeros stay zero
        assert_eq!(&dst[3..6], &[0.5, 0.0, 0.0]);
        // row 2: NaN and inf do not set the scale (amax 3); NaN stays NaN, inf saturates
        assert!(dst[6].is_nan());
        assert_eq!(dst[7], 3.0);
        assert_eq!(dst[8], 3.0);
        assert_eq!(row_scale(Format::E4m3fn, &[0.0, -0.0]), 1.0);
        assert_eq!(row_scale(Format::E5m2, &[57344.0]), 1.0);
    }
}
