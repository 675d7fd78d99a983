//! FP8-weight matmul on Gemma3-270M shapes, and a STREAM-like memory bandwidth probe to judge
//! the memory-bound GEMV against.
//!
//! `cargo bench --bench matmul -- --warm-up-time 1 --measurement-time 3`
//!
//! * `m1/...`: decode-step GEMVs, throughput in weight bytes per second.
//! * `m512/...`: prefill GEMMs, throughput in elements = flops (2*m*k*n) per second. The tied
//!   logits shape is left out at m = 512: prefill only needs the logits of the last position,
//!   and one iteration would be ~170 GFLOP.
//! * `bandwidth/...`: copy (`b = a`) and triad (`a = b + s*c`) over 256 MiB f32 arrays,
//!   throughput counts every array read or written once.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fp8xla::cpu::Isa;
use fp8xla::fp8::Format;
use fp8xla::kernels::{fp8_matmul_with, Fp8Weights, Lhs, WeightScale};
use fp8xla::parallel::{split_range, Parallel, ScopedThreads, Serial};
use std::hint::black_box;

/// (name, outer, k, inner)
const SHAPES: [(&str, usize, usize, usize); 6] = [
    ("kn_640x1024", 1, 640, 1024),
    ("kn_640x256", 1, 640, 256),
    ("kn_1024x640", 1, 1024, 640),
    ("kn_640x2048", 1, 640, 2048),
    ("kn_2048x640", 1, 2048, 640),
    ("nk_640x262144", 262144, 640, 1),
];

fn weights(len: usize) -> Vec<u8> {
    // Finite e4m3fn codes, pseudo-random.
    let mut x = 0x1234_5678u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let c = (x >> 24) as u8;
            if c & 0x7F == 0x7F {
                0x3F
            } else {
                c
            }
        })
        .collect()
}

fn pars() -> [(&'static str, Box<dyn Parallel>); 2] {
    [
        ("serial", Box::new(Serial)),
        ("threads2", Box::new(ScopedThreads(2))),
    ]
}

fn matmul(c: &mut Criterion) {
    for m in [1usize, 512] {
        let mut g = c.benchmark_group(format!("m{m}"));
        for &(name, outer, k, inner) in &SHAPES {
            if m > 1 && inner == 1 {
                continue;
            }
            let n = outer * inner;
            let data = weights(outer * k * inner);
            let lhs: Vec<f32> = (0..m * k)
                .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
                .collect();
            let mut out = vec![0.0f32; m * n];
            let w = Fp8Weights {
                data: &data,
                format: Format::E4m3fn,
                batch: 1,
                outer,
                k,
                inner,
            };
            g.throughput(if m == 1 {
                Throughput::Bytes(data.len() as u64)
            } else {
                Throughput::Elements((2 * m * k * n) as u64)
            });
            if m > 1 {
                g.sample_size(10);
            }
            for isa in Isa::all_supported() {
                for (pname, par) in pars() {
                    let id = BenchmarkId::new(name, format!("{}/{pname}", isa.name()));
                    g.bench_function(id, |b| {
                        b.iter(|| {
                            fp8_matmul_with(
                                isa,
                                par.as_ref(),
                                Lhs::f32(black_box(&lhs)),
                                m,
                                &w,
                                WeightScale::PerTensor(0.5),
                                &mut out,
                            );
                            black_box(&out);
                        })
                    });
                }
            }
        }
        g.finish();
    }
}

fn bandwidth(c: &mut Criterion) {
    const LEN: usize = 64 << 20; // 256 MiB of f32
    let mut a = vec![1.0f32; LEN];
    let mut b = vec![2.0f32; LEN];
    let cc = vec![3.0f32; LEN];
    let mut g = c.benchmark_group("bandwidth");
    g.sample_size(10);
    for threads in [1usize, 2] {
        g.throughput(Throughput::Bytes((2 * LEN * 4) as u64));
        g.bench_function(BenchmarkId::new("copy", threads), |bench| {
            bench.iter(|| {
                let ranges = split_range(LEN, threads, 1024);
                std::thread::scope(|s| {
                    let mut rest: &mut [f32] = &mut b;
                    let mut off = 0;
                    for r in ranges {
                        let (dst, tail) = rest.split_at_mut(r.len());
                        rest = tail;
                        let src = &a[off..off + r.len()];
                        off += r.len();
                        s.spawn(move || dst.copy_from_slice(src));
                    }
                });
                black_box(&b);
            })
        });
        g.throughput(Throughput::Bytes((3 * LEN * 4) as u64));
        g.bench_function(BenchmarkId::new("triad", threads), |bench| {
            bench.iter(|| {
                let ranges = split_range(LEN, threads, 1024);
                std::thread::scope(|s| {
                    let mut rest: &mut [f32] = &mut a;
                    let mut off = 0;
                    for r in ranges {
                        let (dst, tail) = rest.split_at_mut(r.len());
                        rest = tail;
                        let (x, y) = (&b[off..off + r.len()], &cc[off..off + r.len()]);
                        off += r.len();
                        s.spawn(move || {
                            for ((d, &x), &y) in dst.iter_mut().zip(x).zip(y) {
                                *d = x + 3.0 * y;
                            }
                        });
                    }
                });
                black_box(&a);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bandwidth, matmul);
criterion_main!(benches);
