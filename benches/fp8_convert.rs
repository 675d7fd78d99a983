//! FP8 conversion throughput, each instruction-set path side by side.
//!
//! Throughput counts the bytes read plus the bytes written per call (f32 → e4m3fn: 5 bytes
//! per element, e4m3fn → f32: 5, f32 → f32 QDQ: 8).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fp8xla::cpu::Isa;
use fp8xla::fp8::{self, Format};
use std::hint::black_box;

const SIZES: [usize; 2] = [1 << 20, 1 << 24];
/// Not a power of two, so quantization takes the division path.
const SCALE: f32 = 0.37;

/// Values spread over the e4m3fn range at `SCALE`, from a fixed xorshift sequence.
fn inputs(n: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 400.0
        })
        .collect()
}

fn label(n: usize) -> String {
    format!("{}M", n >> 20)
}

fn bench(c: &mut Criterion) {
    let format = Format::E4m3fn;
    for n in SIZES {
        let x = inputs(n);
        let mut codes = vec![0u8; n];
        fp8::quantize(format, SCALE, &x, &mut codes);
        let mut out = vec![0f32; n];
        let mut q = vec![0u8; n];

        let mut g = c.benchmark_group("quantize_f32_e4m3fn");
        g.throughput(Throughput::Bytes((n * 5) as u64));
        g.sample_size(10);
        for isa in Isa::all_supported() {
            g.bench_with_input(BenchmarkId::new(isa.name(), label(n)), &x, |b, x| {
                b.iter(|| fp8::quantize_with(isa, format, black_box(SCALE), x, &mut q))
            });
        }
        g.finish();

        let mut g = c.benchmark_group("dequantize_e4m3fn_f32");
        g.throughput(Throughput::Bytes((n * 5) as u64));
        g.sample_size(10);
        for isa in Isa::all_supported() {
            g.bench_with_input(
                BenchmarkId::new(isa.name(), label(n)),
                &codes,
                |b, codes| {
                    b.iter(|| fp8::dequantize_with(isa, format, black_box(SCALE), codes, &mut out))
                },
            );
        }
        g.finish();

        let mut g = c.benchmark_group("qdq_f32_e4m3fn");
        g.throughput(Throughput::Bytes((n * 8) as u64));
        g.sample_size(10);
        for isa in Isa::all_supported() {
            g.bench_with_input(BenchmarkId::new(isa.name(), label(n)), &x, |b, x| {
                b.iter(|| fp8::qdq_with(isa, format, black_box(SCALE), x, &mut out))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
