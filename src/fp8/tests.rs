//! Tests of the FP8 conversions: scalar `encode` against an independent nearest-value search,
//! every supported vector path against scalar.
use super::*;

const FORMATS: [Format; 2] = [Format::E4m3fn, Format::E5m2];

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

/// xorshift64*: deterministic test data without dependencies.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    /// A value around the FP8 range: random sign, exponent in [-30, 20], random mantissa,
    /// now and then a special value.
    fn interesting(&mut self) -> f32 {
        let r = self.next_u32();
        match r % 64 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5 => f32::from_bits(self.next_u32()),
            _ => {
                let sign = (r >> 31) << 31;
                let exp = (127 - 30 + (self.next_u32() % 51)) << 23;
                f32::from_bits(sign | exp | (self.next_u32() & 0x007F_FFFF))
            }
        }
    }
}

/// Positive finite codes in increasing order of value: 0 ..= the code of max.
fn positive_codes(format: Format) -> Vec<(u8, f64)> {
    let max_code = match format {
        Format::E4m3fn => 0x7E,
        Format::E5m2 => 0x7B,
    };
    (0..=max_code)
        .map(|c| (c, decode(format, c) as f64))
        .collect()
}

/// Independent reference: clamp, then the nearest decoded value by search, ties to the code
/// with an even mantissa lsb; the sign of the input kept.
fn reference_encode(format: Format, codes: &[(u8, f64)], x: f32) -> Option<u8> {
    if x.is_nan() {
        return None;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let v = (x.abs() as f64).min(format.max() as f64);
    // First code whose value is >= v.
    let i = codes.partition_point(|&(_, d)| d < v);
    let (code, _) = if i == 0 {
        codes[0]
    } else if i == codes.len() {
        codes[i - 1]
    } else {
        let (lo, hi) = (codes[i - 1], codes[i]);
        let (dl, dh) = (v - lo.1, hi.1 - v);
        if dl < dh || (dl == dh && lo.0 & 1 == 0) {
            lo
        } else {
            hi
        }
    };
    Some(sign | code)
}

fn check_encode(format: Format, codes: &[(u8, f64)], x: f32) {
    let got = encode(format, x);
    match reference_encode(format, codes, x) {
        Some(want) => assert_eq!(
            got,
            want,
            "{} encode({x:e} = {:#010x}) = {got:#04x}, want {want:#04x}",
            format.name(),
            x.to_bits()
        ),
        None => assert!(
            decode(format, got).is_nan(),
            "{} encode(NaN {:#010x}) = {got:#04x} is not NaN",
            format.name(),
            x.to_bits()
        ),
    }
}

#[test]
fn encode_all_bf16_patterns() {
    for format in FORMATS {
        let codes = positive_codes(format);
        for h in 0..=u16::MAX {
            check_encode(format, &codes, f32::from_bits((h as u32) << 16));
        }
    }
}

#[test]
fn encode_random_bits_and_values() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for format in FORMATS {
        let codes = positive_codes(format);
        for _ in 0..1_000_000 {
            check_encode(format, &codes, f32::from_bits(rng.next_u32()));
            check_encode(format, &codes, rng.interesting());
        }
    }
}

#[test]
fn encode_grid_midpoints_and_neighbours() {
    for format in FORMATS {
        let codes = positive_codes(format);
        let mut xs = vec![
            0.0f32,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::MAX,
            f32::INFINITY,
            format.max() * 1.0001,
            format.max() * 2.0,
        ];
        for w in codes.windows(2) {
            let (lo, hi) = (w[0].1 as f32, w[1].1 as f32);
            let mid = ((w[0].1 + w[1].1) / 2.0) as f32;
            assert_eq!(
                mid as f64,
                (w[0].1 + w[1].1) / 2.0,
                "midpoint not exact in f32"
            );
            xs.extend([lo, hi, mid, mid.next_up(), mid.next_down()]);
            xs.extend([lo.next_up(), lo.next_down(), hi.next_up(), hi.next_down()]);
        }
        // Below the smallest subnormal: half of it ties to zero.
        let q = codes[1].1 as f32;
        xs.extend([
            q / 2.0,
            (q / 2.0).next_up(),
            (q / 2.0).next_down(),
            q / 4.0,
            q * 0.75,
        ]);
        for x in xs {
            check_encode(format, &codes, x);
            check_encode(format, &codes, -x);
        }
        // Spot values.
        assert_eq!(encode(format, f32::INFINITY), encode(format, format.max()));
        assert_eq!(
            encode(format, f32::NEG_INFINITY),
            0x80 | encode(format, format.max())
        );
        assert_eq!(encode(format, -0.0), 0x80);
        assert_eq!(encode(format, 0.0), 0x00);
        assert!(decode(format, encode(format, f32::NAN)).is_nan());
        assert!(decode(format, encode(format, -f32::NAN)).is_nan());
    }
    assert_eq!(encode(Format::E4m3fn, 448.0), 0x7E);
    assert_eq!(encode(Format::E4m3fn, 464.0), 0x7E);
    assert_eq!(encode(Format::E4m3fn, 1e30), 0x7E);
    assert_eq!(encode(Format::E4m3fn, 2f32.powi(-10)), 0x00);
    assert_eq!(encode(Format::E4m3fn, 2f32.powi(-10).next_up()), 0x01);
    assert_eq!(encode(Format::E4m3fn, 3.0 * 2f32.powi(-10)), 0x02);
    assert_eq!(encode(Format::E5m2, 61440.0), 0x7B);
    assert_eq!(encode(Format::E5m2, 2f32.powi(-17)), 0x00);
    assert_eq!(encode(Format::E5m2, -(2f32.powi(-17).next_up())), 0x81);
}

#[test]
fn decode_round_trips() {
    for format in FORMATS {
        for c in 0..=255u8 {
            let v = decode(format, c);
            if v.is_nan() {
                assert!(decode(format, encode(format, v)).is_nan());
            } else if v.is_infinite() {
                assert_eq!(encode(format, v), (c & 0x80) | encode(format, format.max()));
            } else {
                assert_eq!(encode(format, v), c, "{} code {c:#04x}", format.name());
            }
        }
    }
}

#[test]
fn exact_reciprocal_matches_division() {
    let mut rng = Rng(42);
    for scale in [
        1.0f32,
        0.5,
        2.0,
        -4.0,
        2f32.powi(-126),
        2f32.powi(127),
        1024.0,
    ] {
        let r = exact_reciprocal(scale).expect("power of two");
        for _ in 0..100_000 {
            let x = f32::from_bits(rng.next_u32());
            let (a, b) = (x / scale, x * r);
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        }
    }
    for scale in [0.0f32, 3.0, 0.37, f32::INFINITY, f32::NAN, 1e-40] {
        assert!(exact_reciprocal(scale).is_none(), "{scale}");
    }
}

fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn same_bf16(a: bf16, b: bf16) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

const LENGTHS: [usize; 12] = [0, 1, 7, 15, 16, 17, 31, 33, 63, 65, 1000, 4099];
const SCALES: [f32; 9] = [
    1.0,
    0.37,
    1e-3,
    3e5,
    1e-40,
    0.5,
    1.0 / 1_048_576.0,
    -3.0,
    0.0,
];

#[test]
fn every_isa_equals_scalar() {
    let isas = Isa::all_supported();
    let mut rng = Rng(7);
    for format in FORMATS {
        for &len in &LENGTHS {
            let xs: Vec<f32> = (0..len)
                .map(|i| {
                    if i % 3 == 0 {
                        f32::from_bits(rng.next_u32())
                    } else {
                        rng.interesting()
                    }
                })
                .collect();
            let xb: Vec<bf16> = xs
                .iter()
                .map(|&x| bf16::from_bits((x.to_bits() >> 16) as u16))
                .collect();
            let cs: Vec<u8> = (0..len).map(|_| rng.next_u32() as u8).collect();
            for &scale in &SCALES {
                // Spread the values over the scaled FP8 range too.
                let xs: Vec<f32> = xs.iter().map(|&x| x * scale.abs().max(1e-30)).collect();
                let mut q0 = vec![0u8; len];
                let mut qb0 = vec![0u8; len];
                let mut d0 = vec![0f32; len];
                let mut db0 = vec![bf16::ZERO; len];
                let mut r0 = vec![0f32; len];
                let mut rb0 = vec![bf16::ZERO; len];
                quantize_with(Isa::Scalar, format, scale, &xs, &mut q0);
                quantize_bf16_with(Isa::Scalar, format, scale, &xb, &mut qb0);
                dequantize_with(Isa::Scalar, format, scale, &cs, &mut d0);
                dequantize_bf16_with(Isa::Scalar, format, scale, &cs, &mut db0);
                qdq_with(Isa::Scalar, format, scale, &xs, &mut r0);
                qdq_bf16_with(Isa::Scalar, format, scale, &xb, &mut rb0);
                // Scalar QDQ is dequantize(quantize(x)).
                let mut r1 = vec![0f32; len];
                dequantize_with(Isa::Scalar, format, scale, &q0, &mut r1);
                assert!(r0.iter().zip(&r1).all(|(&a, &b)| same_f32(a, b)));
                for &isa in &isas {
                    let ctx = format!("{} {} len {len} scale {scale:e}", isa.name(), format.name());
                    let mut q = vec![0xAAu8; len];
                    quantize_with(isa, format, scale, &xs, &mut q);
                    for i in 0..len {
                        assert_eq!(q[i], q0[i], "quantize {ctx} x[{i}] = {:e}", xs[i]);
                    }
                    let mut q = vec![0xAAu8; len];
                    quantize_bf16_with(isa, format, scale, &xb, &mut q);
                    assert_eq!(q, qb0, "quantize_bf16 {ctx}");
                    let mut d = vec![f32::from_bits(0x7FAA_AAAA); len];
                    dequantize_with(isa, format, scale, &cs, &mut d);
                    for i in 0..len {
                        assert!(
                            same_f32(d[i], d0[i]),
                            "dequantize {ctx} code {:#04x}",
                            cs[i]
                        );
                    }
                    let mut d = vec![bf16::from_bits(0xAAAA); len];
                    dequantize_bf16_with(isa, format, scale, &cs, &mut d);
                    for i in 0..len {
                        assert!(
                            same_bf16(d[i], db0[i]),
                            "dequantize_bf16 {ctx} code {:#04x}",
                            cs[i]
                        );
                    }
                    let mut r = vec![f32::from_bits(0x7FAA_AAAA); len];
                    qdq_with(isa, format, scale, &xs, &mut r);
                    for i in 0..len {
                        assert!(
                            same_f32(r[i], r0[i]),
                            "qdq {ctx} x[{i}] = {:e}: {:e} vs {:e}",
                            xs[i],
                            r[i],
                            r0[i]
                        );
                    }
                    let mut r = vec![bf16::from_bits(0xAAAA); len];
                    qdq_bf16_with(isa, format, scale, &xb, &mut r);
                    for i in 0..len {
                        assert!(same_bf16(r[i], rb0[i]), "qdq_bf16 {ctx} x[{i}] = {}", xb[i]);
                    }
                }
            }
        }
    }
}

#[test]
fn every_isa_all_codes_and_all_bf16() {
    // Every code, and every bf16 pattern, through every path at a few scales.
    let codes: Vec<u8> = (0..=255u8).collect();
    let xb: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    let xs: Vec<f32> = xb.iter().map(|x| x.to_f32()).collect();
    for format in FORMATS {
        for scale in [1.0f32, 0.37, 2f32.powi(-7)] {
            let mut d0 = vec![0f32; 256];
            dequantize_with(Isa::Scalar, format, scale, &codes, &mut d0);
            let mut q0 = vec![0u8; xs.len()];
            quantize_with(Isa::Scalar, format, scale, &xs, &mut q0);
            let mut r0 = vec![bf16::ZERO; xs.len()];
            qdq_bf16_with(Isa::Scalar, format, scale, &xb, &mut r0);
            for isa in Isa::all_supported() {
                let mut d = vec![0f32; 256];
                dequantize_with(isa, format, scale, &codes, &mut d);
                assert!(
                    d.iter().zip(&d0).all(|(&a, &b)| same_f32(a, b)),
                    "{}",
                    isa.name()
                );
                let mut q = vec![0u8; xs.len()];
                quantize_with(isa, format, scale, &xs, &mut q);
                assert_eq!(q, q0, "{}", isa.name());
                let mut q = vec![0u8; xs.len()];
                quantize_bf16_with(isa, format, scale, &xb, &mut q);
                assert_eq!(q, q0, "{}", isa.name());
                let mut r = vec![bf16::ZERO; xs.len()];
                qdq_bf16_with(isa, format, scale, &xb, &mut r);
                assert!(
                    r.iter().zip(&r0).all(|(&a, &b)| same_bf16(a, b)),
                    "{}",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn dequantize_is_decode_times_scale() {
    for format in FORMATS {
        let codes: Vec<u8> = (0..=255u8).collect();
        let mut d = vec![0f32; 256];
        dequantize(format, 0.37, &codes, &mut d);
        for (&c, &v) in codes.iter().zip(&d) {
            assert!(same_f32(v, decode(format, c) * 0.37));
        }
        let mut b = vec![bf16::ZERO; 256];
        dequantize_bf16(format, 0.37, &codes, &mut b);
        for (&c, &v) in codes.iter().zip(&b) {
            assert!(same_bf16(v, bf16::from_f32(decode(format, c) * 0.37)));
        }
    }
}

#[test]
#[should_panic(expected = "lengths differ")]
fn length_mismatch_panics() {
    quantize(Format::E4m3fn, 1.0, &[1.0, 2.0], &mut [0u8; 1]);
}
