//! Portable kernels: plain loops over decoded weights (through an FP8 table, or float32 as
//! is). Bounds are checked by the callers.
use super::{Mul, NR};

/// `acc[r*ncols + c] = sum_kk lhs[r*ls + kk] * dec(w[kk*ncols + c])` for `kk < kr`.
#[allow(clippy::too_many_arguments)]
pub(super) fn kn_rows<T: Copy>(
    dec: impl Fn(T) -> f32,
    lhs: &[f32],
    ls: usize,
    rows: usize,
    kr: usize,
    w: &[T],
    ncols: usize,
    acc: &mut [f32],
) {
    for r in 0..rows {
        let acc = &mut acc[r * ncols..(r + 1) * ncols];
        acc.fill(0.0);
        for kk in 0..kr {
            let a = lhs[r * ls + kk];
            let row = &w[kk * ncols..(kk + 1) * ncols];
            for (o, &q) in acc.iter_mut().zip(row) {
                *o += a * dec(q);
            }
        }
    }
}

/// `out[r*os + c] = mul(c) * sum_kk lhs[r*k + kk] * dec(w[c*k + kk])`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemv_nk<T: Copy>(
    dec: impl Fn(T) -> f32,
    lhs: &[f32],
    rows: usize,
    k: usize,
    w: &[T],
    ncols: usize,
    out: &mut [f32],
    os: usize,
    mul: Mul,
) {
    for c in 0..ncols {
        let col = &w[c * k..(c + 1) * k];
        for r in 0..rows {
            let a = &lhs[r * k..(r + 1) * k];
            let mut acc = [0.0f32; 4];
            let mut ch = col.chunks_exact(4).zip(a.chunks_exact(4));
            for (q, x) in &mut ch {
                for t in 0..4 {
                    acc[t] += x[t] * dec(q[t]);
                }
            }
            let tail = k - k % 4;
            let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
            for kk in tail..k {
                s += a[kk] * dec(col[kk]);
            }
            out[r * os + c] = s * mul.at(c);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn micro(
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
    let mut acc = [[0.0f32; NR]; super::MR];
    for (r, acc) in acc.iter_mut().enumerate().take(mr) {
        let a = &a[r * lda..r * lda + kc];
        for (&x, bk) in a.iter().zip(b.chunks_exact(NR)) {
            for (o, &y) in acc.iter_mut().zip(bk) {
                *o += x * y;
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(mr) {
        let dst = &mut c[r][col..col + cols];
        for (x, d) in dst.iter_mut().enumerate() {
            let mut v = acc[x];
            if !first {
                v += *d;
            }
            if let Some(m) = mul {
                v *= m[x];
            }
            *d = v;
        }
    }
}
