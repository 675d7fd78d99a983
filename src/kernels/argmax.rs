//! Argmax along the last dimension, with the semantics of `jnp.argmax` (the `stablehlo.reduce`
//! with a (value, iota) comparator that JAX lowers it to):
//!
//! - the first index of the largest value (ties go to the lowest index; -0.0 equals +0.0);
//! - a row holding a NaN gives the index of its first NaN (NaN beats every value);
//! - a row of -inf gives 0, as does any row whose largest value comes first.
//!
//! A row is split into pieces scanned in parallel (each piece: its maximum and whether it
//! holds a NaN with independent per-lane accumulators the compiler vectorizes, then the first
//! position of that maximum or NaN); the pieces are then combined in order, so the first
//! occurrence wins across pieces exactly as within one.

use crate::cpu::Isa;
use crate::parallel::{split_range, Parallel};
use std::sync::{Mutex, PoisonError};

/// Input elements, read as f32 exactly.
pub trait ArgmaxInput: Copy + Send + Sync {
    /// The value as an f32 (exact for every implementor).
    fn to_f32(self) -> f32;
}

impl ArgmaxInput for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl ArgmaxInput for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// Independent accumulators of the first pass (two AVX2 vectors).
const LANES: usize = 16;
/// Least elements per piece of a row: below this a row is not split.
const MIN_PIECE: usize = 16 << 10;
/// Least elements of a whole call before it uses more than the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// What one piece of a row holds: its largest value (NaN if it holds one), and the first
/// position of that value (or of its first NaN) in the row.
#[derive(Clone, Copy, Debug)]
struct Best {
    value: f32,
    index: usize,
    nan: bool,
}

impl Best {
    /// The winner of two pieces, `self` coming first in the row.
    fn then(self, later: Best) -> Best {
        if self.nan || !(later.nan || later.value > self.value) {
            self
        } else {
            later
        }
    }
}

/// `out[r]` = the argmax of row `r` of `x` (rows of `n` elements), using the kernels of
/// `Isa::detect()`. Panics if `n` is 0 or `x.len() != out.len() * n`.
pub fn argmax_last<T: ArgmaxInput>(par: &dyn Parallel, x: &[T], n: usize, out: &mut [usize]) {
    argmax_last_with(Isa::detect(), par, x, n, out)
}

/// [`argmax_last`] at an explicit instruction-set level (supported by this CPU).
pub fn argmax_last_with<T: ArgmaxInput>(
    isa: Isa,
    par: &dyn Parallel,
    x: &[T],
    n: usize,
    out: &mut [usize],
) {
    assert!(n > 0, "argmax_last: rows of 0 elements have no argmax");
    assert_eq!(
        x.len(),
        out.len() * n,
        "argmax_last: x is not out.len() rows of n"
    );
    let rows = out.len();
    let workers = par.workers();
    if workers <= 1 || x.len() < PARALLEL_MIN {
        for (o, row) in out.iter_mut().zip(x.chunks_exact(n)) {
            *o = scan(isa, row, 0).index;
        }
        return;
    }
    let pieces = (n / MIN_PIECE).clamp(1, workers * 4);
    if pieces == 1 {
        // Short rows: tasks take whole rows.
        let groups = split_range(rows, workers * 4, 1);
        let mut rest = out;
        let mut slots = Vec::with_capacity(groups.len());
        for g in &groups {
            let (head, tail) = rest.split_at_mut(g.len());
            slots.push(Mutex::new(head));
            rest = tail;
        }
        par.run(groups.len(), &|t| {
            let mut dst = slots[t].lock().unwrap_or_else(PoisonError::into_inner);
            let rows = &x[groups[t].start * n..groups[t].end * n];
            for (o, row) in dst.iter_mut().zip(rows.chunks_exact(n)) {
                *o = scan(isa, row, 0).index;
            }
        });
        return;
    }
    // Long rows (a vocabulary): every row split into pieces, combined in order.
    let ranges = split_range(n, pieces, LANES);
    let per_row = ranges.len();
    let found: Vec<Mutex<Option<Best>>> = (0..rows * per_row).map(|_| Mutex::new(None)).collect();
    par.run(found.len(), &|t| {
        let (r, range) = (t / per_row, ranges[t % per_row].clone());
        let best = scan(isa, &x[r * n..(r + 1) * n][range.clone()], range.start);
        *found[t].lock().unwrap_or_else(PoisonError::into_inner) = Some(best);
    });
    for (o, row) in out.iter_mut().zip(found.chunks_exact(per_row)) {
        let best = row
            .iter()
            .map(|m| {
                m.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .expect("argmax_last: every piece was scanned")
            })
            .reduce(Best::then)
            .expect("argmax_last: a row has at least one piece");
        *o = best.index;
    }
}

/// The [`Best`] of a non-empty piece that starts at `offset` in its row.
fn scan<T: ArgmaxInput>(isa: Isa, xs: &[T], offset: usize) -> Best {
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx2 {
            // SAFETY: `isa` is a level this CPU supports (the callers' contract, as for every
            // kernel), and every level from Avx2 up includes AVX2.
            return unsafe { scan_avx2(xs, offset) };
        }
    }
    let _ = isa;
    scan_body(xs, offset)
}

/// [`scan_body`] compiled for AVX2 (eight lanes a vector instead of SSE2's four).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn scan_avx2<T: ArgmaxInput>(xs: &[T], offset: usize) -> Best {
    scan_body(xs, offset)
}

#[inline(always)]
fn scan_body<T: ArgmaxInput>(xs: &[T], offset: usize) -> Best {
    // First pass: the maximum and whether there is a NaN, in LANES independent lanes.
    // `if x > m { x } else { m }` is exactly one max instruction (it keeps m when x is NaN).
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut nan = [0u32; LANES];
    let blocks = xs.chunks_exact(LANES);
    let tail = blocks.remainder();
    for block in blocks {
        for l in 0..LANES {
            let x = block[l].to_f32();
            m[l] = if x > m[l] { x } else { m[l] };
            nan[l] |= u32::from(x.is_nan());
        }
    }
    let mut max = f32::NEG_INFINITY;
    let mut any_nan = nan.iter().any(|&b| b != 0);
    for &v in m.iter() {
        max = if v > max { v } else { max };
    }
    for x in tail {
        let x = x.to_f32();
        max = if x > max { x } else { max };
        any_nan |= x.is_nan();
    }
    // Second pass: the first position of the NaN or of the maximum (the piece was just read,
    // so it comes from cache; the search stops at the first hit).
    let found = if any_nan {
        first_where(xs, |x| x.is_nan())
    } else {
        first_where(xs, |x| x == max)
    };
    Best {
        value: if any_nan { f32::NAN } else { max },
        // Every element is below or equal to the maximum it gave, which is one of them.
        index: offset + found.expect("argmax: a non-empty piece holds its maximum"),
        nan: any_nan,
    }
}

/// The first position where `hit` holds: blocks of LANES are tested whole (one vector
/// compare each) and only the block with the hit is searched element by element.
#[inline(always)]
fn first_where<T: ArgmaxInput>(xs: &[T], hit: impl Fn(f32) -> bool) -> Option<usize> {
    let blocks = xs.chunks_exact(LANES);
    let tail = xs.len() - blocks.remainder().len();
    for (b, block) in blocks.enumerate() {
        let mut any = false;
        for x in block {
            any |= hit(x.to_f32());
        }
        if any {
            return block
                .iter()
                .position(|x| hit(x.to_f32()))
                .map(|i| b * LANES + i);
        }
    }
    xs[tail..]
        .iter()
        .position(|x| hit(x.to_f32()))
        .map(|i| tail + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::{ScopedThreads, Serial};
    use half::bf16;

    /// numpy's `argmax`, one element at a time: the first NaN, else the first maximum.
    fn reference(row: &[f32]) -> usize {
        if let Some(i) = row.iter().position(|x| x.is_nan()) {
            return i;
        }
        let mut best = 0;
        for (i, &x) in row.iter().enumerate() {
            if x > row[best] {
                best = i;
            }
        }
        best
    }

    /// A small deterministic generator (xorshift).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Rows with few distinct values (many ties), ±0, ±inf and NaN at random places.
    fn awkward_rows(rng: &mut Rng, rows: usize, n: usize) -> Vec<f32> {
        let palette = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
        ];
        let mut x = vec![0f32; rows * n];
        for r in 0..rows {
            let kind = rng.below(6);
            for v in &mut x[r * n..(r + 1) * n] {
                *v = match kind {
                    0 => (rng.below(1000) as f32 - 500.0) / 7.0,
                    1 => palette[rng.below(5)],
                    2 => f32::NEG_INFINITY,
                    3 => palette[rng.below(palette.len())],
                    4 => f32::NAN,
                    _ => -((rng.below(3)) as f32),
                };
            }
            // A few NaNs and maxima dropped at random places.
            for _ in 0..rng.below(3) {
                let i = r * n + rng.below(n);
                x[i] = if rng.below(2) == 0 { f32::NAN } else { 1e30 };
            }
        }
        x
    }

    fn check_all_ways(x: &[f32], n: usize) {
        let rows = x.len() / n;
        let want: Vec<usize> = x.chunks_exact(n).map(reference).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let xb_f32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let want_bf16: Vec<usize> = xb_f32.chunks_exact(n).map(reference).collect();
        for isa in Isa::all_supported() {
            for threads in [1, 2, 3, 5] {
                let par: &dyn Parallel = if threads == 1 {
                    &Serial
                } else {
                    &ScopedThreads(threads)
                };
                let mut got = vec![usize::MAX; rows];
                argmax_last_with(isa, par, x, n, &mut got);
                assert_eq!(got, want, "f32 rows {rows} n {n} {isa:?} threads {threads}");
                let mut got = vec![usize::MAX; rows];
                argmax_last_with(isa, par, &xb, n, &mut got);
                assert_eq!(
                    got, want_bf16,
                    "bf16 rows {rows} n {n} {isa:?} threads {threads}"
                );
            }
        }
    }

    #[test]
    fn equals_the_reference_on_awkward_rows() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for &(rows, n) in &[
            (1, 1),
            (3, 1),
            (1, 15),
            (2, 16),
            (5, 17),
            (0, 7),
            (7, 33),
            (1, 1000),
            (1, 65_537),
            (2, 40_000),
            (40, 2_001),
            (1, 262_144),
        ] {
            check_all_ways(&awkward_rows(&mut rng, rows, n), n);
        }
    }

    #[test]
    fn ties_nan_and_infinities_across_piece_boundaries() {
        // n large enough to be split; the interesting values sit at piece edges and at the
        // ends of the row.
        let n = 200_003;
        let cases: Vec<Vec<(usize, f32)>> = vec![
            vec![],                                             // all equal: index 0
            vec![(n - 1, 5.0)],                                 // the last element
            vec![(n - 1, 5.0), (7, 5.0), (150_000, 5.0)],       // ties: the first
            vec![(100_000, f32::NAN), (3, f32::NAN), (4, 9e9)], // the first NaN
            vec![(n - 1, f32::NAN), (5, f32::INFINITY)],        // NaN beats +inf
            vec![(60_000, f32::INFINITY), (60_001, f32::INFINITY)],
            vec![(12_500, -0.0), (12_499, 0.0)], // ±0 equal when max
        ];
        for base in [0.0f32, f32::NEG_INFINITY, -1.0] {
            for case in &cases {
                let mut x = vec![base; n];
                for &(i, v) in case {
                    x[i] = v;
                }
                check_all_ways(&x, n);
                // The same row twice more, shifted: batch rows are independent.
                let mut two = x.clone();
                two.extend(x.iter().rev());
                check_all_ways(&two, n);
            }
        }
    }

    #[test]
    #[should_panic(expected = "rows of 0 elements")]
    fn empty_rows_are_refused() {
        argmax_last(&Serial, &[0f32; 0], 0, &mut []);
    }
}
