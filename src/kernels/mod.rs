//! Compute kernels: the FP8 matmul, and float32 GEMVs for decode-shaped float32 products.
//!
//! `out = lhs · (f32(decode(w)) · scale)` with f32 accumulation, for FP8 weights stored as
//! `[batch, outer, k, inner]`. Three strategies, picked by the number of lhs rows:
//!
//! * GEMV (`m <= GEMV_MAX_M`): the weights are streamed once, front to back, converted in
//!   registers and multiplied against all lhs rows at once. NK weights: tasks split the output
//!   columns. KN weights: tasks split the rows of each `[k, inner]` slab and their partial
//!   sums are added at the end.
//! * GEMM (larger `m`): weight panels are converted to f32 into a small packed buffer (per
//!   `KC x NC` block) and consumed by a register-blocked FMA microkernel; tasks own column
//!   ranges of the output (so every weight is converted once), and also row ranges when there
//!   are too few columns.
//! * Tile GEMM (AMX, from `tile_min_rows` rows): see [`amx`].
//!
//! The microkernels come from one table per instruction-set level ([`table::Kernels`]),
//! chosen once: scalar, AVX2 (+FMA+F16C), AVX-512 (its own FP8 GEMVs, AVX2's GEMM) and AMX
//! (AVX-512's table plus the tile GEMM).
//!
//! Vector kernels may accumulate in a scaled domain (e4m3fn is widened through f16, which
//! divides every value by 2^8 exactly); the factor is folded into the per-column multiplier
//! applied once at the end.

pub(crate) mod amx;
pub mod argmax;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;
mod table;
#[cfg(test)]
mod tests;
mod wide;

pub use amx::amx_support;
pub use argmax::{argmax_last, argmax_last_with};

use crate::cpu::Isa;
use crate::fp8::{decode, Format};
use crate::parallel::{split_range, Parallel};
use once_cell::sync::Lazy;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Mutex;
pub(crate) use table::Kernels;

/// The activations (lhs) of an FP8 matmul, packed `[batch, m, k]` row-major.
#[derive(Clone, Copy, Debug)]
pub enum Lhs<'a> {
    /// float32 values (weight-only quantization). The tile GEMM splits each value into two
    /// bfloat16 (`hi + lo`, about 2^-16 relative error per product) unless `bf16_ok`.
    F32 { values: &'a [f32], bf16_ok: bool },
    /// FP8 codes with one scale: the value of code `q` is `decode(q) * scale` (activations
    /// quantized with `a_scale`). Products of two FP8 values are exact in every kernel.
    Fp8 {
        codes: &'a [u8],
        format: Format,
        scale: f32,
    },
}

impl<'a> Lhs<'a> {
    /// float32 activations, kept at float32 precision.
    pub fn f32(values: &'a [f32]) -> Lhs<'a> {
        Lhs::F32 {
            values,
            bf16_ok: false,
        }
    }

    fn len(&self) -> usize {
        match self {
            Lhs::F32 { values, .. } => values.len(),
            Lhs::Fp8 { codes, .. } => codes.len(),
        }
    }
}

/// How the decoded weights are scaled.
#[derive(Clone, Copy, Debug)]
pub enum WeightScale<'a> {
    /// One factor for every weight.
    PerTensor(f32),
    /// One factor per output column and batch: `len == batch * n`, indexed `[b * n + col]`.
    PerChannel(&'a [f32]),
}

/// FP8 weights of logical shape `[batch, outer, k, inner]`, row-major (contiguous).
///
/// The output column of `(o, i)` is `o * inner + i`, so `n = outer * inner`.
/// `inner == 1` is the "NK" layout (each output column is a contiguous k-row), `outer == 1` the
/// "KN" layout; both `> 1` covers per-head kernels such as `[heads, k, head_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Weights<'a> {
    pub data: &'a [u8],
    pub format: Format,
    pub batch: usize,
    pub outer: usize,
    pub k: usize,
    pub inner: usize,
}

impl Fp8Weights<'_> {
    /// Number of output columns, `outer * inner`.
    pub fn n(&self) -> usize {
        self.outer * self.inner
    }
}

/// Largest `m` that takes the weight-streaming GEMV path.
const GEMV_MAX_M: usize = 4;
/// GEMM blocking: rows per microkernel call, columns per packed panel, panels per block and
/// the largest depth of a block.
const MR: usize = 6;
const NR: usize = 16;
const NC: usize = 128;
const KC_MAX: usize = 256;
/// Weight bytes per GEMV task at least, and the size below which a GEMV stays on the calling
/// thread. Measured on XLA's pool at M=1 (`fp8xla matmuls`): 64 KiB gave a 1.96x geometric
/// mean over Gemma3-270M's block shapes, against 1.84x at 256 KiB and 1.39x at 4 MiB.
const GEMV_MIN_TASK_BYTES: usize = 64 << 10;
const GEMV_MIN_PARALLEL_BYTES: usize = 64 << 10;
/// Weight bytes per GEMV task at most: the thread that finishes first waits for the other's
/// last task, so large GEMVs (the tied logits: 168 MB) get many small tasks instead of
/// `workers * 4` long ones.
const GEMV_MAX_TASK_BYTES: usize = 2 << 20;

/// `out = lhs · (decode(w) · scale)` using the kernels of `Isa::detect()`.
///
/// `lhs` is `[batch, m, k]` and `out` is `[batch, m, n]`, both row-major contiguous; `out`
/// is fully overwritten. Panics if a slice length does not match the shapes.
pub fn fp8_matmul(
    par: &dyn Parallel,
    lhs: Lhs,
    m: usize,
    w: &Fp8Weights,
    scale: WeightScale,
    out: &mut [f32],
) {
    fp8_matmul_with(Isa::detect(), par, lhs, m, w, scale, out)
}

/// Same as [`fp8_matmul`] with an explicit instruction-set level (which must be supported by
/// this machine).
pub fn fp8_matmul_with(
    isa: Isa,
    par: &dyn Parallel,
    lhs: Lhs,
    m: usize,
    w: &Fp8Weights,
    scale: WeightScale,
    out: &mut [f32],
) {
    fp8_matmul_on(Kernels::for_isa(isa), par, lhs, m, w, scale, out)
}

/// [`fp8_matmul`] on a given kernel table.
pub(crate) fn fp8_matmul_on(
    kern: &'static Kernels,
    par: &dyn Parallel,
    lhs: Lhs,
    m: usize,
    w: &Fp8Weights,
    scale: WeightScale,
    out: &mut [f32],
) {
    let (batch, outer, k, inner) = (w.batch, w.outer, w.k, w.inner);
    let n = outer.checked_mul(inner).expect("fp8_matmul: n overflows");
    let prod = |xs: &[usize]| {
        xs.iter()
            .try_fold(1usize, |a, &x| a.checked_mul(x))
            .expect("fp8_matmul: size overflows")
    };
    assert_eq!(
        w.data.len(),
        prod(&[batch, outer, k, inner]),
        "fp8_matmul: weight length"
    );
    assert_eq!(lhs.len(), prod(&[batch, m, k]), "fp8_matmul: lhs length");
    assert_eq!(out.len(), prod(&[batch, m, n]), "fp8_matmul: out length");
    if let WeightScale::PerChannel(s) = scale {
        assert_eq!(s.len(), prod(&[batch, n]), "fp8_matmul: scale length");
    }
    if trivial(k, out) {
        return;
    }
    if let Some(tiles) = kern.tile_gemm {
        if m >= kern.tile_min_rows {
            return tiles(par, &lhs, m, w, scale, out);
        }
    }
    // The f32 kernels take values: FP8 activations are decoded (exactly what the QDQ of the
    // fake-quant reference gives).
    let decoded;
    let values = match lhs {
        Lhs::F32 { values, .. } => values,
        Lhs::Fp8 {
            codes,
            format,
            scale,
        } => {
            let mut v = vec![0f32; codes.len()];
            crate::fp8::dequantize(format, scale, codes, &mut v);
            decoded = v;
            &decoded[..]
        }
    };
    let p = Problem {
        kern,
        fmt: w.format,
        lhs: values,
        m,
        w: w.data,
        batch,
        outer,
        k,
        inner,
        n,
        scale,
    };
    if m <= GEMV_MAX_M {
        gemv(&p, par, out);
    } else {
        gemm(&p, par, out);
    }
}

/// What the kernels run on this machine, as one JSON object: the level in use (`isa`), the
/// best one supported, why that level, what runs for each product shape, and every level's
/// availability with the reason when it is not available.
pub fn info_json() -> String {
    let sel = Isa::selection();
    let levels: Vec<serde_json::Value> = sel
        .levels
        .iter()
        .map(|a| {
            serde_json::json!({
                "isa": a.isa.name(),
                "available": a.available,
                "reason": a.reason,
            })
        })
        .collect();
    let kern = Kernels::for_isa(sel.chosen);
    serde_json::json!({
        "isa": kern.isa.name(),
        "supported": sel.supported.name(),
        "why": sel.why,
        "kernels": kern.describe(),
        "levels": levels,
    })
    .to_string()
}

/// Float32 weights of logical shape `[batch, outer, k, inner]`, row-major: the layout of
/// [`Fp8Weights`], for products whose large operand is a float32 tensor (in a decode step,
/// attention over the KV cache: `[positions, head_dim]` read once per step).
#[derive(Clone, Copy, Debug)]
pub struct F32Weights<'a> {
    pub data: &'a [f32],
    pub batch: usize,
    pub outer: usize,
    pub k: usize,
    pub inner: usize,
}

/// `out = lhs · w` in float32 with the GEMV kernels, using the best kernels of this CPU.
///
/// Shapes as for [`fp8_matmul`]. The weights are streamed once per group of up to
/// `GEMV_MAX_M` lhs rows: made for a few rows against a large `w` (the kernels read `w` front
/// to back in both layouts, so a KN operand needs no transposed copy).
pub fn f32_matmul(par: &dyn Parallel, lhs: &[f32], m: usize, w: &F32Weights, out: &mut [f32]) {
    f32_matmul_with(Isa::detect(), par, lhs, m, w, out)
}

/// Same as [`f32_matmul`] with an explicit instruction-set level (supported by this CPU).
pub fn f32_matmul_with(
    isa: Isa,
    par: &dyn Parallel,
    lhs: &[f32],
    m: usize,
    w: &F32Weights,
    out: &mut [f32],
) {
    let (batch, outer, k, inner) = (w.batch, w.outer, w.k, w.inner);
    let prod = |xs: &[usize]| {
        xs.iter()
            .try_fold(1usize, |a, &x| a.checked_mul(x))
            .expect("f32_matmul: size overflows")
    };
    let (n, per_batch) = (prod(&[outer, inner]), prod(&[outer, k, inner]));
    assert_eq!(
        w.data.len(),
        prod(&[batch, per_batch]),
        "f32_matmul: weight length"
    );
    assert_eq!(lhs.len(), prod(&[batch, m, k]), "f32_matmul: lhs length");
    assert_eq!(out.len(), prod(&[batch, m, n]), "f32_matmul: out length");
    if trivial(k, out) {
        return;
    }
    let kern = Kernels::for_isa(isa);
    for b in 0..batch {
        let wb = &w.data[b * per_batch..(b + 1) * per_batch];
        for r0 in (0..m).step_by(GEMV_MAX_M) {
            let r1 = (r0 + GEMV_MAX_M).min(m);
            let rows = r1 - r0;
            let g = GemvShape {
                lhs: &lhs[(b * m + r0) * k..(b * m + r1) * k],
                batch: 1,
                m: rows,
                k,
                outer,
                inner,
                n,
                bytes: per_batch * std::mem::size_of::<f32>(),
            };
            let dst = &mut out[(b * m + r0) * n..(b * m + r1) * n];
            if inner == 1 {
                gemv_nk_columns(&g, par, dst, &|_, cols, lhs, dst, os| {
                    let w = &wb[cols.start * k..cols.end * k];
                    (kern.gemv_nk_f32)(lhs, rows, k, w, cols.len(), dst, os)
                });
            } else {
                let kernel = |s: usize, kr: Range<usize>, lhs: &[f32], acc: &mut [f32]| {
                    let w = &wb[(s * k + kr.start) * inner..(s * k + kr.end) * inner];
                    (kern.kn_rows_f32)(lhs, k, rows, kr.len(), w, inner, acc)
                };
                gemv_kn_slabs(&g, par, dst, &kernel, &|_, _| Mul::ONE);
            }
        }
    }
}

/// The bounds an NK GEMV kernel relies on (lengths in elements): up to 4 lhs rows of `k`,
/// `ncols` weight rows of `k`, and outputs `r * os + c` for `r < rows`, `c < ncols`.
pub(crate) fn check_nk(
    lhs: usize,
    rows: usize,
    k: usize,
    w: usize,
    ncols: usize,
    out: usize,
    os: usize,
) {
    assert!((1..=4).contains(&rows) && k >= 1);
    assert!(lhs >= rows * k && w >= ncols * k);
    assert!(out >= (rows - 1) * os + ncols);
}

/// The bounds a KN pass relies on (lengths in elements): up to 4 rows of `kr` lhs values at
/// stride `ls`, `kr` weight rows of `ncols`, and `rows * ncols` accumulators.
pub(crate) fn check_kn(
    lhs: usize,
    ls: usize,
    rows: usize,
    kr: usize,
    w: usize,
    ncols: usize,
    acc: usize,
) {
    assert!((1..=4).contains(&rows) && kr >= 1 && kr <= ls);
    assert!(lhs >= (rows - 1) * ls + kr && w >= kr * ncols);
    assert!(acc >= rows * ncols);
}

/// Does the products that need no kernel: an empty output, or a zero depth (all sums are 0).
/// Returns whether `out` is done.
fn trivial(k: usize, out: &mut [f32]) -> bool {
    if k == 0 {
        out.fill(0.0);
    }
    out.is_empty() || k == 0
}

static E4M3: Lazy<[f32; 256]> = Lazy::new(|| crate::fp8::decode_table(Format::E4m3fn));
static E5M2: Lazy<[f32; 256]> = Lazy::new(|| crate::fp8::decode_table(Format::E5m2));
static E4M3_SCALED: Lazy<[f32; 256]> =
    Lazy::new(|| std::array::from_fn(|c| decode(Format::E4m3fn, c as u8) / 256.0));

/// Exact decoded values of a format.
fn table(fmt: Format) -> &'static [f32; 256] {
    match fmt {
        Format::E4m3fn => &E4M3,
        Format::E5m2 => &E5M2,
    }
}

/// Per-column factor applied to the accumulated sums: `unit * scale[col]`.
#[derive(Clone, Copy)]
pub(crate) struct Mul<'a> {
    unit: f32,
    /// Per-channel scales of the columns the kernel writes (starting at its first column).
    per: Option<&'a [f32]>,
    /// `unit * scale` for per-tensor scaling.
    tensor: f32,
}

impl<'a> Mul<'a> {
    /// Leaves the sums as they are.
    const ONE: Mul<'static> = Mul {
        unit: 1.0,
        per: None,
        tensor: 1.0,
    };

    #[inline]
    fn at(&self, c: usize) -> f32 {
        match self.per {
            Some(s) => self.unit * s[c],
            None => self.tensor,
        }
    }
}

struct Problem<'a> {
    kern: &'static Kernels,
    fmt: Format,
    lhs: &'a [f32],
    m: usize,
    w: &'a [u8],
    batch: usize,
    outer: usize,
    k: usize,
    inner: usize,
    n: usize,
    scale: WeightScale<'a>,
}

impl<'a> Problem<'a> {
    /// Multiplier for columns `c0..` of batch `b`.
    fn mul(&self, b: usize, c0: usize) -> Mul<'a> {
        let (_, unit) = self.kern.domain(self.fmt);
        match self.scale {
            WeightScale::PerTensor(s) => Mul {
                unit,
                per: None,
                tensor: unit * s,
            },
            WeightScale::PerChannel(s) => Mul {
                unit,
                per: Some(&s[b * self.n + c0..(b + 1) * self.n]),
                tensor: 0.0,
            },
        }
    }
    fn weights(&self, b: usize) -> &'a [u8] {
        let len = self.outer * self.k * self.inner;
        &self.w[b * len..(b + 1) * len]
    }
}

/// What the GEMV drivers need of a problem; the kernels that touch the weights come as
/// closures, so FP8 and float32 weights share the task splitting.
struct GemvShape<'a> {
    lhs: &'a [f32],
    batch: usize,
    m: usize,
    k: usize,
    outer: usize,
    inner: usize,
    n: usize,
    /// Size of all the weights in bytes (decides the number of tasks).
    bytes: usize,
}

/// Writes `out[r*os + (c - cols.start)]` for the rows `r < m` and the columns `cols` of batch
/// `b`, given that batch's lhs rows.
type NkKernel<'a> = dyn Fn(usize, Range<usize>, &[f32], &mut [f32], usize) + Sync + 'a;
/// Sets `acc[r*inner + c]` to the partial sums over the weight rows `rows` of slab `s`, given
/// the lhs of the slab's batch from column `rows.start` on (row stride `k`).
type KnKernel<'a> = dyn Fn(usize, Range<usize>, &[f32], &mut [f32]) + Sync + 'a;

/// One GEMV task: batch `b`, output columns `c0..c1`.
struct ColTask {
    b: usize,
    c0: usize,
    c1: usize,
}

/// How many GEMV tasks `bytes` of weights are worth on `par` for `m` rows.
fn gemv_tasks(par: &dyn Parallel, bytes: usize, m: usize) -> usize {
    let workers = par.workers();
    if workers > 1 && bytes * m >= GEMV_MIN_PARALLEL_BYTES {
        (workers * 4)
            .max(bytes / GEMV_MAX_TASK_BYTES)
            .min((bytes / GEMV_MIN_TASK_BYTES).max(1))
    } else {
        1
    }
}

fn gemv(p: &Problem, par: &dyn Parallel, out: &mut [f32]) {
    let g = GemvShape {
        lhs: p.lhs,
        batch: p.batch,
        m: p.m,
        k: p.k,
        outer: p.outer,
        inner: p.inner,
        n: p.n,
        bytes: p.w.len(),
    };
    let (m, k, inner) = (p.m, p.k, p.inner);
    if inner == 1 {
        gemv_nk_columns(&g, par, out, &|b, cols, lhs, dst, os| {
            let wb = p.weights(b);
            let w = &wb[cols.start * k..cols.end * k];
            let mul = p.mul(b, cols.start);
            (p.kern.gemv_nk)(p.fmt, lhs, m, k, w, cols.len(), dst, os, mul)
        })
    } else {
        let slab = |s: usize, rows: &Range<usize>| {
            &p.w[(s * k + rows.start) * inner..(s * k + rows.end) * inner]
        };
        gemv_kn_slabs(
            &g,
            par,
            out,
            &|s, rows, lhs, acc| {
                let w = slab(s, &rows);
                (p.kern.kn_rows)(p.fmt, lhs, k, m, rows.len(), w, inner, acc)
            },
            &|b, c0| p.mul(b, c0),
        )
    }
}

/// NK weights: each task takes a range of output columns, i.e. of contiguous weight rows.
fn gemv_nk_columns(g: &GemvShape, par: &dyn Parallel, out: &mut [f32], kernel: &NkKernel) {
    let (m, n, k) = (g.m, g.n, g.k);
    let want = gemv_tasks(par, g.bytes, m);
    let per_batch = want.div_ceil(g.batch).max(1);
    let mut tasks = Vec::new();
    for b in 0..g.batch {
        for r in split_range(n, per_batch, 8) {
            tasks.push(ColTask {
                b,
                c0: r.start,
                c1: r.end,
            });
        }
    }
    let compute = |t: &ColTask, dst: &mut [f32]| {
        let lhs = &g.lhs[t.b * m * k..(t.b + 1) * m * k];
        kernel(t.b, t.c0..t.c1, lhs, dst, t.c1 - t.c0);
    };
    if m == 1 {
        // Each task writes a contiguous piece of `out`.
        let mut pieces = Vec::with_capacity(tasks.len());
        let mut rest = out;
        for t in &tasks {
            let (piece, tail) = rest.split_at_mut(t.c1 - t.c0);
            pieces.push(Mutex::new(piece));
            rest = tail;
        }
        debug_assert!(rest.is_empty());
        par.run(tasks.len(), &|i| {
            let mut piece = pieces[i].lock().unwrap();
            compute(&tasks[i], &mut piece);
        });
    } else {
        let results: Vec<Mutex<Vec<f32>>> = tasks.iter().map(|_| Mutex::new(Vec::new())).collect();
        par.run(tasks.len(), &|i| {
            let t = &tasks[i];
            let mut buf = vec![0.0f32; m * (t.c1 - t.c0)];
            compute(t, &mut buf);
            *results[i].lock().unwrap() = buf;
        });
        for (t, r) in tasks.iter().zip(results) {
            let buf = r.into_inner().unwrap();
            let w = t.c1 - t.c0;
            for (row, src) in buf.chunks_exact(w).enumerate() {
                let at = (t.b * m + row) * n + t.c0;
                out[at..at + w].copy_from_slice(src);
            }
        }
    }
}

/// Partial sums (f32 per task) above which a KN GEMV takes one row range per worker only.
const KN_WIDE_PARTIAL: usize = 16384;

/// KN weights (`[batch, outer, k, inner]` with `inner > 1`): every `(b, o)` slab is `k` rows
/// of `inner` output columns. Tasks take row ranges of a slab, so each streams one contiguous
/// piece of memory front to back, and their partial sums are added up at the end, times
/// `mul(b, first column of the slab)`. (Walking column blocks down the rows instead reads one
/// cache line per row at a stride of `inner` bytes, which the memory system serves at about a
/// third of the speed: 1.2-2.0 against 4.7-5.6 GB/s on one core, measured from DRAM on
/// Gemma3-270M's shapes.)
fn gemv_kn_slabs<'a>(
    g: &GemvShape,
    par: &dyn Parallel,
    out: &mut [f32],
    kernel: &KnKernel,
    mul: &dyn Fn(usize, usize) -> Mul<'a>,
) {
    let (m, n, k, inner) = (g.m, g.n, g.k, g.inner);
    let slabs = g.batch * g.outer;
    let mut chunks = gemv_tasks(par, g.bytes, m).div_ceil(slabs).clamp(1, k);
    if m * inner > KN_WIDE_PARTIAL {
        // Wide slabs (an untied LM head `[d, vocab]` is one slab of `vocab` columns): each
        // task's partial sums are as wide as the slab, and allocating, zeroing and adding up
        // one per 2 MiB task cost more than the weights' stream (a 640 x 262144 e4m3 GEMV ran
        // at 2.9 GB/s; at 13 GB/s with one task per worker).
        chunks = chunks.min(par.workers().div_ceil(slabs));
    }
    let ranges = split_range(k, chunks, 1);
    let tasks: Vec<(usize, Range<usize>)> = (0..slabs)
        .flat_map(|s| ranges.iter().map(move |r| (s, r.clone())))
        .collect();
    let partials: Vec<Mutex<Vec<f32>>> = tasks.iter().map(|_| Mutex::new(Vec::new())).collect();
    par.run(tasks.len(), &|i| {
        let (s, ref kr) = tasks[i];
        let b = s / g.outer;
        let lhs = &g.lhs[b * m * k + kr.start..(b + 1) * m * k];
        let mut acc = vec![0.0f32; m * inner];
        kernel(s, kr.clone(), lhs, &mut acc);
        *partials[i].lock().unwrap_or_else(|e| e.into_inner()) = acc;
    });
    let partials: Vec<Vec<f32>> = partials
        .into_iter()
        .map(|x| x.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect();
    for (s, parts) in partials.chunks(ranges.len()).enumerate() {
        let (b, o) = (s / g.outer, s % g.outer);
        let mul = mul(b, o * inner);
        for r in 0..m {
            let dst = &mut out[(b * m + r) * n + o * inner..][..inner];
            dst.copy_from_slice(&parts[0][r * inner..(r + 1) * inner]);
            for part in &parts[1..] {
                for (d, x) in dst.iter_mut().zip(&part[r * inner..(r + 1) * inner]) {
                    *d += x;
                }
            }
            for (c, d) in dst.iter_mut().enumerate() {
                *d *= mul.at(c);
            }
        }
    }
}

thread_local! {
    static PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One GEMM task: batch `b`, output rows `r0..r1`, columns `c0..c1`.
struct BlockTask {
    b: usize,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
}

fn gemm(p: &Problem, par: &dyn Parallel, out: &mut [f32]) {
    let (m, n, k) = (p.m, p.n, p.k);
    let workers = par.workers();
    // Split the columns first: every task converts only the weights of its columns. Rows are
    // split only when there are too few column panels.
    let want = if workers > 1 { workers * 3 } else { 1 };
    let per_batch = want.div_ceil(p.batch);
    let col_ranges = split_range(n, per_batch, NR);
    let row_parts = per_batch
        .div_ceil(col_ranges.len())
        .clamp(1, m.div_ceil(4 * MR));
    let row_ranges = split_range(m, row_parts, MR);
    let mut tasks = Vec::new();
    for b in 0..p.batch {
        for r in &row_ranges {
            for c in &col_ranges {
                tasks.push(BlockTask {
                    b,
                    r0: r.start,
                    r1: r.end,
                    c0: c.start,
                    c1: c.end,
                });
            }
        }
    }
    // Hand every task the pieces of the output rows it owns.
    let mut owned: Vec<Vec<&mut [f32]>> = tasks.iter().map(|_| Vec::new()).collect();
    let mut rows = out.chunks_exact_mut(n);
    let per_b = row_ranges.len() * col_ranges.len();
    for b in 0..p.batch {
        for (ri, r) in row_ranges.iter().enumerate() {
            for _ in r.clone() {
                let mut row = rows.next().expect("output rows");
                for (ci, c) in col_ranges.iter().enumerate() {
                    let (piece, rest) = row.split_at_mut(c.len());
                    owned[b * per_b + ri * col_ranges.len() + ci].push(piece);
                    row = rest;
                }
            }
        }
    }
    let owned: Vec<Mutex<Vec<&mut [f32]>>> = owned.into_iter().map(Mutex::new).collect();
    let kblocks = k.div_ceil(KC_MAX);
    let kc_size = k.div_ceil(kblocks);
    par.run(tasks.len(), &|i| {
        let t = &tasks[i];
        let mut c = owned[i].lock().unwrap();
        let lhs = &p.lhs[(t.b * m + t.r0) * k..(t.b * m + t.r1) * k];
        let rows = t.r1 - t.r0;
        let wb = p.weights(t.b);
        PACK.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(kc_size * NC, 0.0);
            for jc in (t.c0..t.c1).step_by(NC) {
                let nc = NC.min(t.c1 - jc);
                let mut pc = 0;
                while pc < k {
                    let kc = kc_size.min(k - pc);
                    for (pi, j) in (jc..jc + nc).step_by(NR).enumerate() {
                        let cols = NR.min(jc + nc - j);
                        let dst = &mut buf[pi * kc * NR..(pi + 1) * kc * NR];
                        pack_panel(p, wb, j, cols, pc, kc, dst);
                    }
                    let (first, last) = (pc == 0, pc + kc == k);
                    for ir in (0..rows).step_by(MR) {
                        let mr = MR.min(rows - ir);
                        for (pi, j) in (jc..jc + nc).step_by(NR).enumerate() {
                            let cols = NR.min(jc + nc - j);
                            let mut mul = [0.0f32; NR];
                            if last {
                                let mu = p.mul(t.b, j);
                                for (x, v) in mul.iter_mut().take(cols).enumerate() {
                                    *v = mu.at(x);
                                }
                            }
                            micro(
                                p.kern,
                                &lhs[ir * k + pc..],
                                mr,
                                k,
                                kc,
                                &buf[pi * kc * NR..(pi + 1) * kc * NR],
                                &mut c[ir..ir + mr],
                                j - t.c0,
                                cols,
                                first,
                                last.then_some(&mul),
                            );
                        }
                    }
                    pc += kc;
                }
            }
        });
    });
}

/// Packs weight columns `j..j+cols` (`cols <= NR`) and depths `pc..pc+kc` of one batch into
/// `dst[kk * NR + x]` in the backend's domain, zero-filling columns `cols..NR`.
fn pack_panel(
    p: &Problem,
    wb: &[u8],
    j: usize,
    cols: usize,
    pc: usize,
    kc: usize,
    dst: &mut [f32],
) {
    let (k, inner) = (p.k, p.inner);
    let (o, i0) = (j / inner, j % inner);
    if let Some(pack_kn) = p.kern.pack_kn {
        if cols == NR && i0 + NR <= inner {
            let start = o * k * inner + pc * inner + i0;
            let end = start + (kc - 1) * inner + NR;
            pack_kn(p.fmt, &wb[start..end], inner, kc, dst);
            return;
        }
    }
    if let Some(pack_nk) = p.kern.pack_nk {
        if inner == 1 {
            pack_nk(p.fmt, &wb[j * k..(j + cols) * k], k, pc, kc, cols, dst);
            return;
        }
    }
    let (tab, _) = p.kern.domain(p.fmt);
    for x in 0..NR {
        if x < cols {
            let c = j + x;
            let base = (c / inner) * k * inner + c % inner;
            for kk in 0..kc {
                dst[kk * NR + x] = tab[wb[base + (pc + kk) * inner] as usize];
            }
        } else {
            for kk in 0..kc {
                dst[kk * NR + x] = 0.0;
            }
        }
    }
}

/// Microkernel: for `r < mr`, `x < cols`:
/// `c[r][col + x] = (first ? 0 : c[..]) + sum_kk a[r*lda + kk] * b[kk*NR + x]`, then times
/// `mul[x]` if given.
#[allow(clippy::too_many_arguments)]
fn micro(
    kern: &Kernels,
    a: &[f32],
    mr: usize,
    lda: usize,
    kc: usize,
    b: &[f32],
    c: &mut [&mut [f32]],
    col: usize,
    cols: usize,
    first: bool,
    mul: Option<&[f32; NR]>,
) {
    assert!((1..=MR).contains(&mr) && (1..=NR).contains(&cols) && c.len() >= mr);
    assert!(a.len() >= (mr - 1) * lda + kc && b.len() >= kc * NR);
    assert!(c.iter().take(mr).all(|row| row.len() >= col + cols));
    (kern.micro)(a, mr, lda, kc, b, c, col, cols, first, mul)
}
