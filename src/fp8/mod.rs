//! FP8 formats e4m3fn and e5m2: scalar and vectorized conversions.
//!
//! Semantics follow `ml_dtypes` bit for bit. Quantization is `q = sat(RNE(x / scale))`: the
//! division is an IEEE f32 division (not a multiply by the reciprocal), values are clamped to
//! ±max of the format before rounding, NaN stays NaN.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes() {
        assert_eq!(decode(Format::E4m3fn, 0x7E), 448.0);
        assert_eq!(decode(Format::E4m3fn, 0x01), 2f32.powi(-9));
        assert_eq!(decode(Format::E4m3fn, 0x38), 1.0);
        assert!(decode(Format::E4m3fn, 0xFF).is_nan());
        assert_eq!(decode(Format::E5m2, 0x7B), 57344.0);
        assert_eq!(decode(Format::E5m2, 0x7C), f32::INFINITY);
        assert_eq!(decode(Format::E5m2, 0xFC), f32::NEG_INFINITY);
        assert!(decode(Format::E5m2, 0x7D).is_nan());
        assert_eq!(decode(Format::E5m2, 0x01), 2f32.powi(-16));
        assert_eq!(decode(Format::E5m2, 0x3C), 1.0);
        assert_eq!(decode(Format::E5m2, 0x80).to_bits(), (-0.0f32).to_bits());
    }
}
