//! Parse + quantize time (and the passes run alone) on the tiny Gemma3 generate-step module.

use criterion::{criterion_group, criterion_main, Criterion};
use fp8xla::rewrite;

fn data(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR")))
        .expect("test data")
}

fn bench(c: &mut Criterion) {
    let module = data("gemma3.mlir");
    let options = data("gemma3.quantize.json");
    c.bench_function("parse gemma3", |b| {
        b.iter(|| rewrite::parse_module(std::hint::black_box(&module)).unwrap())
    });
    c.bench_function("parse+print gemma3", |b| {
        b.iter(|| rewrite::print_module(&rewrite::parse_module(&module).unwrap()))
    });
    c.bench_function("quantize gemma3", |b| {
        b.iter(|| rewrite::quantize(std::hint::black_box(&module), &options).unwrap())
    });
    c.bench_function("instrument gemma3", |b| {
        b.iter(|| rewrite::instrument(std::hint::black_box(&module), "{}").unwrap())
    });
    for pass in ["update_slices_in_place", "decode_dots"] {
        c.bench_function(&format!("{pass} gemma3"), |b| {
            b.iter(|| rewrite::run_pass(pass, std::hint::black_box(&module), "{}").unwrap())
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
