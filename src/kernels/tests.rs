use super::*;
use crate::parallel::{ScopedThreads, Serial};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    /// A random finite, non-NaN code.
    fn code(&mut self, fmt: Format) -> u8 {
        loop {
            let c = self.next() as u8;
            if decode(fmt, c).is_finite() {
                return c;
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    batch: usize,
    outer: usize,
    k: usize,
    inner: usize,
    fmt: Format,
    per_channel: bool,
    threads: usize,
}

struct Data {
    lhs: Vec<f32>,
    w: Vec<u8>,
    scale: Vec<f32>,
}

fn make(c: &Case, seed: u64) -> Data {
    let mut rng = Rng(seed);
    let n = c.outer * c.inner;
    Data {
        lhs: (0..c.batch * c.m * c.k)
            .map(|_| rng.f32(-1.0, 1.0))
            .collect(),
        w: (0..c.batch * c.outer * c.k * c.inner)
            .map(|_| rng.code(c.fmt))
            .collect(),
        scale: if c.per_channel {
            (0..c.batch * n).map(|_| rng.f32(0.25, 2.0)).collect()
        } else {
            vec![rng.f32(0.25, 2.0)]
        },
    }
}

/// float64 triple loop of `sum lhs * (decode(w) * scale)`.
fn reference(c: &Case, d: &Data) -> Vec<f64> {
    let lhs: Vec<f64> = d.lhs.iter().map(|&x| x as f64).collect();
    reference_with(c, d, &lhs)
}

/// [`reference`] with the activations given in float64.
fn reference_with(c: &Case, d: &Data, lhs: &[f64]) -> Vec<f64> {
    let n = c.outer * c.inner;
    let mut out = vec![0.0f64; c.batch * c.m * n];
    for b in 0..c.batch {
        for o in 0..c.outer {
            for i in 0..c.inner {
                let col = o * c.inner + i;
                let s = if c.per_channel {
                    d.scale[b * n + col]
                } else {
                    d.scale[0]
                } as f64;
                for r in 0..c.m {
                    let mut acc = 0.0f64;
                    for kk in 0..c.k {
                        let q = d.w[((b * c.outer + o) * c.k + kk) * c.inner + i];
                        let wv = decode(c.fmt, q) as f64 * s;
                        acc += lhs[(b * c.m + r) * c.k + kk] * wv;
                    }
                    out[(b * c.m + r) * n + col] = acc;
                }
            }
        }
    }
    out
}

/// Every kernel table testable on this machine: the levels it runs, then the software models of
/// the AVX-512 GEMVs and the AMX tile GEMM (which run everywhere). Says once which real levels
/// were skipped and why.
fn tables() -> Vec<(String, &'static Kernels)> {
    static SKIPPED: std::sync::Once = std::sync::Once::new();
    SKIPPED.call_once(|| {
        for a in &Isa::selection().levels {
            if !a.available {
                println!(
                    "SKIPPED: the real {} kernels ({}); their software model runs instead",
                    a.isa.name(),
                    a.reason
                );
            }
        }
    });
    let mut out: Vec<(String, &'static Kernels)> = Isa::all_supported()
        .into_iter()
        .map(|isa| (isa.name().to_string(), Kernels::for_isa(isa)))
        .collect();
    for (name, t) in ["model avx512 GEMV", "model amx tiles"]
        .into_iter()
        .zip(Kernels::models())
    {
        out.push((name.to_string(), t));
    }
    out
}

/// The tables that have a tile GEMM: the model, and the real one where AMX runs.
fn tile_tables() -> Vec<(String, &'static Kernels)> {
    tables()
        .into_iter()
        .filter(|(_, t)| t.tile_gemm.is_some())
        .collect()
}

fn run(kern: &'static Kernels, c: &Case, d: &Data) -> Vec<f32> {
    run_lhs(kern, c, d, Lhs::f32(&d.lhs))
}

fn run_lhs(kern: &'static Kernels, c: &Case, d: &Data, lhs: Lhs) -> Vec<f32> {
    let n = c.outer * c.inner;
    let mut out = vec![f32::NAN; c.batch * c.m * n];
    let w = Fp8Weights {
        data: &d.w,
        format: c.fmt,
        batch: c.batch,
        outer: c.outer,
        k: c.k,
        inner: c.inner,
    };
    let scale = if c.per_channel {
        WeightScale::PerChannel(&d.scale)
    } else {
        WeightScale::PerTensor(d.scale[0])
    };
    if c.threads > 1 {
        let par = ScopedThreads(c.threads);
        fp8_matmul_on(kern, &par, lhs, c.m, &w, scale, &mut out);
    } else {
        fp8_matmul_on(kern, &Serial, lhs, c.m, &w, scale, &mut out);
    }
    out
}

/// Normwise relative error `max |out - ref| / max |ref|` must be <= 1e-5; NaN/inf must match.
fn compare(c: &Case, got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    let max_ref = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |a, v| a.max(v.abs()));
    let mut max_diff = 0.0f64;
    for (idx, (&g, &r)) in got.iter().zip(want).enumerate() {
        if r.is_nan() || r.is_infinite() {
            let same = (r.is_nan() && g.is_nan()) || (g as f64 == r);
            assert!(same, "{what} {c:?}: element {idx} is {g}, want {r}");
            continue;
        }
        assert!(
            g.is_finite(),
            "{what} {c:?}: element {idx} is {g}, want {r}"
        );
        max_diff = max_diff.max((g as f64 - r).abs());
    }
    let tol = 1e-5 * max_ref.max(1e-30);
    assert!(
        max_diff <= tol,
        "{what} {c:?}: max diff {max_diff} vs max |ref| {max_ref}"
    );
}

/// Products above this many multiply-adds skip the software models (plain Rust, one value at
/// a time: the largest Gemma3 shapes would take minutes); the models still see Gemma3 shapes
/// below it and the edge grid of `tile_gemm_edges`.
const MODEL_MAX_MACS: usize = 400 << 20;

fn check(c: Case, seed: u64) {
    let d = make(&c, seed);
    let want = reference(&c, &d);
    let macs = c.batch * c.m * c.k * c.outer * c.inner;
    for (name, kern) in tables() {
        if name.starts_with("model") && macs > MODEL_MAX_MACS {
            println!("{name}: skipped {c:?} ({macs} multiply-adds, above MODEL_MAX_MACS)");
            continue;
        }
        let got = run(kern, &c, &d);
        compare(&c, &got, &want, &name);
    }
}

#[test]
fn small_shapes_every_path() {
    let mut seed = 1;
    for fmt in [Format::E4m3fn, Format::E5m2] {
        for m in [0, 1, 2, 3, 4, 5, 7, 17] {
            for k in [0, 1, 15, 33] {
                // (outer, inner): KN, NK, per-head, wider KN/NK with vector tails.
                for (outer, inner) in [(1, 7), (31, 1), (3, 5), (1, 40), (40, 1), (2, 33)] {
                    seed += 1;
                    check(
                        Case {
                            m,
                            batch: 1 + 2 * (seed as usize % 2),
                            outer,
                            k,
                            inner,
                            fmt,
                            per_channel: seed % 3 != 0,
                            threads: if seed % 4 < 2 { 1 } else { 3 },
                        },
                        seed,
                    );
                }
            }
        }
    }
}

#[test]
fn empty_shapes() {
    for (m, outer, k, inner) in [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 4, 0), (2, 3, 0, 5)] {
        for batch in [0, 1, 3] {
            check(
                Case {
                    m,
                    batch,
                    outer,
                    k,
                    inner,
                    fmt: Format::E4m3fn,
                    per_channel: true,
                    threads: 3,
                },
                9,
            );
        }
    }
}

#[test]
fn block_shapes() {
    // KN [640, 256], NK [256, 640], per-head [4, 64, 64] with vector-multiple sizes, across
    // the GEMV and GEMM paths.
    let mut seed = 100;
    for fmt in [Format::E4m3fn, Format::E5m2] {
        for m in [1, 2, 3, 5, 17, 64] {
            for (outer, k, inner) in [(1, 640, 256), (256, 640, 1), (4, 64, 64), (1, 300, 31)] {
                seed += 1;
                check(
                    Case {
                        m,
                        batch: if seed % 2 == 0 { 3 } else { 1 },
                        outer,
                        k,
                        inner,
                        fmt,
                        per_channel: seed % 3 == 0,
                        threads: if seed % 4 < 2 { 3 } else { 1 },
                    },
                    seed,
                );
            }
        }
    }
}

#[test]
fn nan_and_inf_codes_propagate() {
    for fmt in [Format::E4m3fn, Format::E5m2] {
        for (m, outer, k, inner) in [
            (1, 1, 40, 48),
            (1, 1, 40, 96),
            (2, 1, 40, 64),
            (1, 48, 40, 1),
            (2, 48, 40, 1),
            (9, 1, 40, 48),
            (9, 48, 40, 1),
        ] {
            let c = Case {
                m,
                batch: 1,
                outer,
                k,
                inner,
                fmt,
                per_channel: false,
                threads: 1,
            };
            let mut d = make(&c, 77);
            let n = outer * inner;
            // Weight index of (kk, col) in this batch-1 layout.
            let at = |kk: usize, col: usize| (col / inner * k + kk) * inner + col % inner;
            let nan = if fmt == Format::E4m3fn { 0x7F } else { 0x7E };
            d.w[at(3, 5)] = nan;
            d.w[at(20, 17 % n)] = nan | 0x80;
            if fmt == Format::E5m2 {
                d.w[at(7, 30)] = 0x7C; // +inf
                d.w[at(8, 31)] = 0xFC; // -inf
            }
            let want = reference(&c, &d);
            assert!(want[5].is_nan());
            for (name, kern) in tables() {
                compare(&c, &run(kern, &c, &d), &want, &name);
            }
        }
    }
}

/// Gemma3-270M shapes, GEMV and prefill GEMM. Slow without optimisations.
#[test]
#[cfg_attr(debug_assertions, ignore)]
fn model_shapes() {
    let mut seed = 1000;
    for fmt in [Format::E4m3fn, Format::E5m2] {
        for (m, outer, k, inner) in [
            (1, 1, 640, 2048),
            (3, 1, 2048, 640),
            (1, 4, 640, 256),
            (512, 1, 640, 2048),
            (512, 1, 2048, 640),
            (512, 4, 640, 256),
            (64, 2048, 640, 1),
            (100, 1, 1024, 640),
        ] {
            seed += 1;
            check(
                Case {
                    m,
                    batch: 1,
                    outer,
                    k,
                    inner,
                    fmt,
                    per_channel: seed % 2 == 0,
                    threads: 3,
                },
                seed,
            );
        }
    }
}

/// Tied-logits GEMV: [262144, 640] NK, m = 1; and a large batched NK GEMV with 3 rows, which
/// also splits into more tasks than `workers * 4` (tasks hold at most `GEMV_MAX_TASK_BYTES`).
#[test]
#[cfg_attr(debug_assertions, ignore)]
fn logits_gemv() {
    check(
        Case {
            m: 3,
            batch: 2,
            outer: 20001,
            k: 640,
            inner: 1,
            fmt: Format::E5m2,
            per_channel: true,
            threads: 2,
        },
        6,
    );
    check(
        Case {
            m: 1,
            batch: 1,
            outer: 262144,
            k: 640,
            inner: 1,
            fmt: Format::E4m3fn,
            per_channel: true,
            threads: 3,
        },
        5,
    );
}

/// KN GEMVs wider than `KN_WIDE_PARTIAL` outputs (an untied LM head `[d, vocab]`), which take
/// one row range per worker: one slab of an odd width, and more slabs than workers.
#[test]
fn wide_kn_gemv() {
    for (seed, (m, batch, outer, k, inner, fmt, threads)) in [
        (1, 1, 1, 640, 20001, Format::E4m3fn, 3),
        (3, 2, 2, 33, 16385, Format::E5m2, 2),
        (4, 1, 1, 7, 16400, Format::E4m3fn, 2),
    ]
    .into_iter()
    .enumerate()
    {
        check(
            Case {
                m,
                batch,
                outer,
                k,
                inner,
                fmt,
                per_channel: seed % 2 == 0,
                threads,
            },
            700 + seed as u64,
        );
    }
    check_f32(1, 1, 1, 130, 17001, 2, 710);
    check_f32(3, 2, 1, 9, 16392, 3, 711);
}

/// `f32_matmul` against a float64 triple loop, on every ISA, from a NaN-poisoned output.
fn check_f32(
    m: usize,
    batch: usize,
    outer: usize,
    k: usize,
    inner: usize,
    threads: usize,
    seed: u64,
) {
    let mut rng = Rng(seed);
    let n = outer * inner;
    let lhs: Vec<f32> = (0..batch * m * k).map(|_| rng.f32(-1.0, 1.0)).collect();
    let w: Vec<f32> = (0..batch * outer * k * inner)
        .map(|_| rng.f32(-2.0, 2.0))
        .collect();
    let mut want = vec![0.0f64; batch * m * n];
    for b in 0..batch {
        for r in 0..m {
            for o in 0..outer {
                for i in 0..inner {
                    want[(b * m + r) * n + o * inner + i] = (0..k)
                        .map(|kk| {
                            lhs[(b * m + r) * k + kk] as f64
                                * w[((b * outer + o) * k + kk) * inner + i] as f64
                        })
                        .sum();
                }
            }
        }
    }
    let weights = F32Weights {
        data: &w,
        batch,
        outer,
        k,
        inner,
    };
    let case = Case {
        m,
        batch,
        outer,
        k,
        inner,
        fmt: Format::E4m3fn,
        per_channel: false,
        threads,
    };
    for isa in Isa::all_supported() {
        let mut out = vec![f32::NAN; want.len()];
        if threads > 1 {
            f32_matmul_with(isa, &ScopedThreads(threads), &lhs, m, &weights, &mut out);
        } else {
            f32_matmul_with(isa, &Serial, &lhs, m, &weights, &mut out);
        }
        compare(&case, &out, &want, &format!("f32 {}", isa.name()));
    }
}

#[test]
fn f32_gemv_awkward_shapes() {
    let mut seed = 500;
    for m in [0, 1, 2, 3, 4, 5, 9] {
        for k in [0, 1, 2, 15, 16, 17, 33] {
            // KN with vector tails, NK with odd column counts, per-head layouts.
            for (outer, inner) in [(1, 7), (1, 8), (1, 41), (31, 1), (5, 1), (3, 5), (2, 9)] {
                seed += 1;
                let batch = [1, 2, 0][seed as usize % 3];
                check_f32(m, batch, outer, k, inner, 1 + 2 * (seed as usize % 2), seed);
            }
        }
    }
}

#[test]
fn f32_gemv_attention_shapes() {
    // Gemma3-270M decode: scores `q[4, 256] . keys[640, 256]` (NK) and the weighted sum
    // `p[4, 640] . values[640, 256]` (KN), large enough to take several tasks.
    for (m, outer, k, inner) in [
        (4, 640, 256, 1),
        (4, 1, 640, 256),
        (1, 640, 256, 1),
        (3, 1, 640, 256),
    ] {
        for threads in [1, 2] {
            check_f32(m, 1, outer, k, inner, threads, (m * 7 + threads) as u64);
        }
    }
}

#[test]
fn f32_gemv_propagates_nan_and_inf() {
    // One non-finite weight poisons exactly the outputs that read it, in both layouts.
    for (outer, k, inner) in [(37, 50, 1), (1, 50, 37)] {
        let (m, n) = (3, outer * inner);
        let lhs = vec![0.5f32; m * k];
        for isa in Isa::all_supported() {
            for bad in [f32::NAN, f32::INFINITY] {
                let mut w = vec![0.25f32; outer * k * inner];
                // Column 5 at depth 7 (a vector lane in NK, inside a vector step in KN).
                let at = if inner == 1 { 5 * k + 7 } else { 7 * inner + 5 };
                w[at] = bad;
                let weights = F32Weights {
                    data: &w,
                    batch: 1,
                    outer,
                    k,
                    inner,
                };
                let mut out = vec![0.0f32; m * n];
                f32_matmul_with(isa, &Serial, &lhs, m, &weights, &mut out);
                for r in 0..m {
                    for c in 0..n {
                        let v = out[r * n + c];
                        if c == 5 {
                            assert!(
                                if bad.is_nan() {
                                    v.is_nan()
                                } else {
                                    v == f32::INFINITY
                                },
                                "{} {outer}x{k}x{inner}: out[{r},{c}] = {v}",
                                isa.name()
                            );
                        } else {
                            assert_eq!(v, 0.125 * k as f32, "{} out[{r},{c}]", isa.name());
                        }
                    }
                }
            }
        }
    }
}

/// The tile GEMM over the edge grid: rows around whole tiles (0, 1, 3, 17, 512, 513), depths
/// and columns that are not multiples of the tile sizes, both formats and scale kinds.
#[test]
fn tile_gemm_edges() {
    let mut seed = 5000;
    for fmt in [Format::E4m3fn, Format::E5m2] {
        for m in [0, 1, 3, 17, 512, 513] {
            for (outer, k, inner) in [(1, 33, 70), (45, 65, 1), (3, 31, 17), (1, 1, 15)] {
                seed += 1;
                let c = Case {
                    m,
                    batch: 1 + seed as usize % 2,
                    outer,
                    k,
                    inner,
                    fmt,
                    per_channel: seed % 3 != 0,
                    threads: if seed % 2 == 0 { 3 } else { 1 },
                };
                let d = make(&c, seed);
                let want = reference(&c, &d);
                for (name, kern) in tile_tables() {
                    compare(&c, &run(kern, &c, &d), &want, &name);
                }
            }
        }
    }
}

/// FP8 activations (the w+a mode) on every table: the result is the fake-quant reference
/// (decoded codes times the scale, in float64) up to the order of the float32 sums.
#[test]
fn fp8_activations_match_the_fake_quant_reference() {
    let mut seed = 6000;
    for fmt in [Format::E4m3fn, Format::E5m2] {
        for (m, outer, k, inner) in [
            (1, 1, 40, 33),
            (3, 20, 64, 1),
            (17, 1, 96, 48),
            (40, 3, 33, 5),
        ] {
            seed += 1;
            let c = Case {
                m,
                batch: 2,
                outer,
                k,
                inner,
                fmt,
                per_channel: seed % 2 == 0,
                threads: 3,
            };
            let mut rng = Rng(seed);
            let mut d = make(&c, seed);
            let a_scale = 0.037f32;
            let codes: Vec<u8> = (0..d.lhs.len()).map(|_| rng.code(Format::E4m3fn)).collect();
            // The reference sees the dequantized activations.
            d.lhs = codes
                .iter()
                .map(|&q| (decode(Format::E4m3fn, q) as f64 * a_scale as f64) as f32)
                .collect();
            let exact: Vec<f64> = codes
                .iter()
                .map(|&q| decode(Format::E4m3fn, q) as f64 * a_scale as f64)
                .collect();
            let want = reference_with(&c, &d, &exact);
            let lhs = Lhs::Fp8 {
                codes: &codes,
                format: Format::E4m3fn,
                scale: a_scale,
            };
            for (name, kern) in tables() {
                compare(&c, &run_lhs(kern, &c, &d, lhs), &want, &name);
            }
        }
    }
}

/// `precision = "bf16"`: the tiles round the activations to bf16 once, so the result is the
/// reference on bf16-rounded activations; the other tables keep float32 (also within it).
#[test]
fn bf16_activations_match_the_reference_on_rounded_values() {
    let mut seed = 7000;
    for fmt in [Format::E4m3fn, Format::E5m2] {
        for (m, outer, k, inner) in [(17, 1, 96, 48), (33, 40, 64, 1)] {
            seed += 1;
            let c = Case {
                m,
                batch: 1,
                outer,
                k,
                inner,
                fmt,
                per_channel: true,
                threads: 3,
            };
            let d = make(&c, seed);
            let rounded: Vec<f64> = d
                .lhs
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f64())
                .collect();
            let want = reference_with(&c, &d, &rounded);
            let lhs = Lhs::F32 {
                values: &d.lhs,
                bf16_ok: true,
            };
            for (name, kern) in tile_tables() {
                compare(&c, &run_lhs(kern, &c, &d, lhs), &want, &name);
            }
            // And the tile result differs from the float32 one: the rounding really happened
            // (a test that could not fail otherwise).
            let (_, model) = tile_tables().pop().expect("the tile model");
            let exact = reference(&c, &d);
            let got = run_lhs(model, &c, &d, lhs);
            assert!(got
                .iter()
                .zip(&exact)
                .any(|(g, r)| (*g as f64 - r).abs() > 1e-4 * r.abs()));
        }
    }
}

/// Activations of every magnitude up to 1e30 (the AVX2 e4m3fn GEMVs multiply activations by
/// 2^112 when all are below 2^15, and must take the exact conversion otherwise), and weights
/// that are all subnormal codes (f32 subnormals in that conversion), on every table.
#[test]
fn large_activations_and_subnormal_codes() {
    let mut seed = 8000;
    for (m, outer, k, inner) in [
        (1, 1, 64, 64),
        (1, 40, 96, 1),
        (2, 24, 64, 1),
        (2, 1, 33, 96),
    ] {
        for big in [0.0f32, 40000.0, 1e30] {
            for subnormal_only in [false, true] {
                seed += 1;
                let c = Case {
                    m,
                    batch: 1,
                    outer,
                    k,
                    inner,
                    fmt: Format::E4m3fn,
                    per_channel: seed % 2 == 0,
                    threads: 1 + (seed % 2) as usize * 2,
                };
                let mut rng = Rng(seed);
                let mut d = make(&c, seed);
                if big > 0.0 {
                    // One large activation per row, the others as drawn.
                    for r in 0..m {
                        d.lhs[r * k + (rng.next() as usize % k)] = big;
                    }
                }
                if subnormal_only {
                    // Codes 0x01..=0x07 and 0x81..=0x87: exponent field 0, nonzero mantissa.
                    for w in d.w.iter_mut() {
                        *w = (1 + rng.next() % 7) as u8 | ((rng.next() % 2) as u8) << 7;
                    }
                }
                let want = reference(&c, &d);
                assert!(want.iter().all(|v| v.is_finite() && *v != 0.0));
                for (name, kern) in tables() {
                    let what = format!("{name} (big {big}, subnormal only {subnormal_only})");
                    compare(&c, &run(kern, &c, &d), &want, &what);
                }
            }
        }
    }
}
