//! The FP8 matmul on AMX bf16 tiles, for many lhs rows (prefill, scoring, batched generate).
//!
//! Every FP8 value is a bfloat16 exactly (both formats fit bf16's exponent and mantissa), so
//! the weights are widened to bf16 while they are packed into tile panels (they stay one byte
//! in memory and on disk), and `tdpbf16ps` multiplies them with float32 accumulation:
//!
//! * FP8 activations (`a_scale`, the w+a mode): decoded to bf16 exactly, the scale applied in
//!   the epilogue; every product is exact, so the result is the fake-quant reference up to the
//!   order of the float32 sums.
//! * float32 activations: split `hi = bf16(x)`, `lo = bf16(x - hi)` and both products
//!   accumulated (in separate tiles, added in the epilogue; about 2^-16 relative error per
//!   product, far below the FP8 weight error), unless the caller allows plain bf16
//!   activations (`precision = "bf16"`, like oneDNN's bf16 fpmath mode), which also covers
//!   bf16 inputs (exact).
//!
//! Blocking: the activations are packed once (all rows, all depths: tiles of 16 rows x 32
//! depths); tasks own ranges of output columns and pack the weights of 64 columns at a time
//! (all depths), then sweep every row block against them, so each weight is widened once.
//! One block is 32 rows x 32 columns (4 C tiles, 2 A, 2 B) in the bf16 modes, 16 x 32 with
//! hi and lo (2 C tiles each, 2 A, 2 B) in the split mode. Depths and rows are zero-padded to
//! whole tiles; the epilogue writes only the real rows and columns.
//!
//! The code below is written against [`tiles::TileUnit`], so the same packing, blocking and
//! epilogue run on the hardware (`hw::AmxUnit`) and on the software model
//! (`tiles::TileModel`, the tests).
#![allow(clippy::too_many_arguments)]

#[cfg(target_arch = "x86_64")]
mod hw;
mod pack;
pub(crate) mod tiles;

use super::{Fp8Weights, Kernels, Lhs, WeightScale};
use crate::fp8::{decode, Format};
use crate::parallel::{split_range, Parallel};
use half::bf16;
use std::sync::Mutex;
use tiles::{TileUnit, ROWS, ROW_BYTES};

/// bf16 values in one tile row.
const KSTEP: usize = ROW_BYTES / 2;
/// Output columns whose weights a task packs at a time.
const PANEL_COLS: usize = 64;
/// The fewest lhs rows that take the tile GEMM. Not yet measured on AMX hardware: below it the
/// AVX-512/AVX2 f32 GEMM runs. The weight widening costs the same per call on both paths, so
/// the tiles should win from about one full tile of rows; `fp8xla matmuls --m M` on an AMX
/// machine sets this.
pub(crate) const TILE_MIN_ROWS: usize = 16;

/// Whether this machine can run the AMX kernels, and if not, why.
pub fn amx_support() -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        hw::support()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err("not an x86-64 CPU".to_string())
    }
}

/// The AMX table: AVX-512's with the tile GEMM, handed out only where AMX runs.
#[cfg(target_arch = "x86_64")]
pub(super) fn table() -> Option<&'static Kernels> {
    use crate::cpu::Isa;
    (Isa::supported() >= Isa::Amx).then_some(&TABLE)
}

#[cfg(target_arch = "x86_64")]
static TABLE: Kernels = Kernels {
    isa: crate::cpu::Isa::Amx,
    tile_gemm: Some(|par, lhs, m, w, scale, out| {
        // SAFETY: reachable only through `TABLE`, which `table` hands out where AMX runs.
        unsafe { gemm::<hw::AmxUnit>(par, lhs, m, w, scale, out) }
    }),
    tile_min_rows: TILE_MIN_ROWS,
    ..super::avx512::TABLE
};

/// The scalar table with the tile GEMM on the software model, from the first row count
/// above the GEMV's (so the tests send every GEMM-shaped case through the tiles).
#[cfg(test)]
pub(crate) static MODEL_TABLE: Kernels = Kernels {
    tile_gemm: Some(|par, lhs, m, w, scale, out| {
        // SAFETY: the model uses no special instructions.
        unsafe { gemm::<tiles::TileModel>(par, lhs, m, w, scale, out) }
    }),
    tile_min_rows: super::GEMV_MAX_M + 1,
    ..super::table::SCALAR
};

/// bf16 bits of every code of `fmt` (exact).
fn bf16_table(fmt: Format) -> [u16; 256] {
    std::array::from_fn(|c| bf16::from_f32(decode(fmt, c as u8)).to_bits())
}

/// How the activations go into tiles.
enum Mode {
    /// One bf16 per value (FP8 codes, or values allowed to round to bf16).
    Single,
    /// `hi` and `lo` bf16 per value.
    Split,
}

/// Activations of one batch packed into A tiles: tile `(rt, ks)` (rows `16 rt..`, depths
/// `32 ks..`) at `((rt * ksteps + ks) * 16 + r) * 32 + kk`.
struct PackedLhs {
    hi: Vec<u16>,
    lo: Vec<u16>,
    /// Applied in the epilogue (the FP8 activation scale, else 1).
    scale: f32,
}

/// Packs the activations of batch `b`, one task per group of row tiles (each row tile is a
/// contiguous piece of the packed buffers).
fn pack_lhs(
    par: &dyn Parallel,
    lhs: &Lhs,
    b: usize,
    m: usize,
    k: usize,
    row_tiles: usize,
    ksteps: usize,
) -> PackedLhs {
    let tile_len = ksteps * ROWS * KSTEP;
    let split = matches!(lhs, Lhs::F32 { bf16_ok: false, .. });
    let mut hi = vec![0u16; row_tiles * tile_len];
    let mut lo = if split {
        vec![0u16; row_tiles * tile_len]
    } else {
        Vec::new()
    };
    // The row tiles that hold real rows, in groups of about equal work.
    let real_tiles = m.div_ceil(ROWS);
    let groups = split_range(real_tiles, par.workers() * 2, 1);
    let mut hi_parts: Vec<&mut [u16]> = Vec::new();
    let mut lo_parts: Vec<&mut [u16]> = Vec::new();
    let (mut hi_rest, mut lo_rest) = (&mut hi[..], &mut lo[..]);
    for g in &groups {
        let (h, t) = hi_rest.split_at_mut(g.len() * tile_len);
        hi_parts.push(h);
        hi_rest = t;
        if split {
            let (l, t) = lo_rest.split_at_mut(g.len() * tile_len);
            lo_parts.push(l);
            lo_rest = t;
        }
    }
    let hi_parts: Vec<Mutex<&mut [u16]>> = hi_parts.into_iter().map(Mutex::new).collect();
    let lo_parts: Vec<Mutex<&mut [u16]>> = lo_parts.into_iter().map(Mutex::new).collect();
    par.run(groups.len(), &|gi| {
        let tiles = &groups[gi];
        let mut hi = hi_parts[gi].lock().unwrap_or_else(|e| e.into_inner());
        let mut lo_guard = lo_parts
            .get(gi)
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
        let mut row_hi = vec![0u16; k];
        let mut row_lo = vec![0u16; if split { k } else { 0 }];
        for r in tiles.start * ROWS..(tiles.end * ROWS).min(m) {
            let src = (b * m + r) * k..(b * m + r + 1) * k;
            match *lhs {
                Lhs::Fp8 { codes, format, .. } => {
                    pack::codes_to_bf16(format, &codes[src], &mut row_hi)
                }
                Lhs::F32 { values, .. } => {
                    pack::f32_to_bf16(&values[src], &mut row_hi, split.then_some(&mut row_lo[..]))
                }
            }
            // Offset of (row r, depth 0) inside this group's piece; each 32 depths are a row
            // of the next tile.
            let base = ((r / ROWS - tiles.start) * ksteps * ROWS + r % ROWS) * KSTEP;
            for ks in 0..ksteps {
                let (k0, k1) = (ks * KSTEP, (ks * KSTEP + KSTEP).min(k));
                let at = base + ks * ROWS * KSTEP;
                hi[at..at + (k1 - k0)].copy_from_slice(&row_hi[k0..k1]);
                if let Some(lo) = lo_guard.as_mut() {
                    lo[at..at + (k1 - k0)].copy_from_slice(&row_lo[k0..k1]);
                }
            }
        }
    });
    let scale = match *lhs {
        Lhs::Fp8 { scale, .. } => scale,
        Lhs::F32 { .. } => 1.0,
    };
    PackedLhs { hi, lo, scale }
}

/// Packs the weights of columns `j0..j0 + 16 * col_tiles` (those `>= n` as zeros) of one batch
/// into B tiles: tile `(ct, ks)` at `((ct * ksteps + ks) * 16 + p) * 32 + 2x + t` holds depth
/// `32 ks + 2p + t` of column `j0 + 16 ct + x`.
///
/// The source is read in its own order, so the reads stream and convert a run at a time:
/// NK weights (each column's depths contiguous) column by column, KN weights (each depth's
/// columns contiguous) depth by depth over the whole panel.
fn pack_weights(
    w: &Fp8Weights,
    wb: &[u8],
    j0: usize,
    col_tiles: usize,
    ksteps: usize,
    dst: &mut Vec<u16>,
    run: &mut Vec<u16>,
) {
    let (k, inner, n) = (w.k, w.inner, w.n());
    let tile_len = ROWS * KSTEP;
    let c_end = (j0 + 16 * col_tiles).min(n);
    let cols = c_end - j0;
    // Every value is written below except the padding (depths past k, columns past n), so
    // only a panel with padding needs zeroing first.
    if k % KSTEP != 0 || cols < 16 * col_tiles {
        dst.clear();
    }
    dst.resize(col_tiles * ksteps * tile_len, 0);
    let i0 = j0 % inner;
    if inner > 1 && i0 + cols <= inner {
        // All columns of the panel in one KN slab: each depth is a contiguous run. Two depths
        // (2p, 2p+1) make one tile row per 16 columns, interleaved.
        run.resize(2 * cols, 0);
        let base = (j0 / inner) * k * inner + i0;
        for kk in (0..k).step_by(2) {
            let (r0, r1) = run.split_at_mut(cols);
            pack::codes_to_bf16(w.format, &wb[base + kk * inner..][..cols], r0);
            if kk + 1 < k {
                pack::codes_to_bf16(w.format, &wb[base + (kk + 1) * inner..][..cols], r1);
            } else {
                r1.fill(0);
            }
            let (ks, p) = (kk / KSTEP, (kk % KSTEP) / 2);
            for ct in 0..cols.div_ceil(16) {
                let row = ((ct * ksteps + ks) * ROWS + p) * KSTEP;
                let (c0, c1) = (16 * ct, (16 * ct + 16).min(cols));
                let pairs = dst[row..row + 2 * (c1 - c0)].chunks_exact_mut(2);
                for ((d, &a), &b) in pairs.zip(&r0[c0..c1]).zip(&r1[c0..c1]) {
                    d[0] = a;
                    d[1] = b;
                }
            }
        }
        return;
    }
    // Column by column: NK weights (contiguous depths), or KN panels that straddle slabs.
    run.resize(k, 0);
    let tab = if inner == 1 {
        None
    } else {
        Some(bf16_table(w.format))
    };
    for col in j0..c_end {
        let (ct, x) = ((col - j0) / 16, (col - j0) % 16);
        let base = (col / inner) * k * inner + col % inner;
        match &tab {
            None => pack::codes_to_bf16(w.format, &wb[base..base + k], run),
            Some(tab) => {
                for (kk, v) in run.iter_mut().enumerate() {
                    *v = tab[wb[base + kk * inner] as usize];
                }
            }
        }
        for (ks, depths) in run.chunks(KSTEP).enumerate() {
            let tile = &mut dst[(ct * ksteps + ks) * tile_len..][..tile_len];
            for (p, pair) in depths.chunks(2).enumerate() {
                let at = p * KSTEP + 2 * x;
                tile[at] = pair[0];
                if let Some(&second) = pair.get(1) {
                    tile[at + 1] = second;
                }
            }
        }
    }
}

/// `out = lhs · decode(w) · scale` on tiles.
///
/// # Safety
/// `U`'s instructions must be available on this CPU (and the OS grant held).
pub(crate) unsafe fn gemm<U: TileUnit>(
    par: &dyn Parallel,
    lhs: &Lhs,
    m: usize,
    w: &Fp8Weights,
    scale: WeightScale,
    out: &mut [f32],
) {
    let (k, n) = (w.k, w.n());
    let ksteps = k.div_ceil(KSTEP);
    let row_tiles = m.div_ceil(2 * ROWS) * 2;
    let mode = match lhs {
        Lhs::F32 { bf16_ok: false, .. } => Mode::Split,
        _ => Mode::Single,
    };
    let per_batch = w.outer * k * w.inner;
    let workers = par.workers();
    for b in 0..w.batch {
        let a = pack_lhs(par, lhs, b, m, k, row_tiles, ksteps);
        let wb = &w.data[b * per_batch..(b + 1) * per_batch];
        let ranges = split_range(n, if workers > 1 { workers * 3 } else { 1 }, 2 * 16);
        // Every task owns its columns of every output row of this batch.
        let mut owned: Vec<Vec<&mut [f32]>> = ranges.iter().map(|_| Vec::new()).collect();
        for mut row in out[b * m * n..(b + 1) * m * n].chunks_exact_mut(n) {
            for (i, r) in ranges.iter().enumerate() {
                let (piece, rest) = row.split_at_mut(r.len());
                owned[i].push(piece);
                row = rest;
            }
        }
        let owned: Vec<Mutex<Vec<&mut [f32]>>> = owned.into_iter().map(Mutex::new).collect();
        let col_scale = |c: usize| match scale {
            WeightScale::PerTensor(s) => s,
            WeightScale::PerChannel(s) => s[b * n + c],
        };
        par.run(ranges.len(), &|i| {
            let cols = &ranges[i];
            let mut rows = owned[i].lock().unwrap_or_else(|e| e.into_inner());
            let mut unit = U::default();
            let mut panel = Vec::new();
            let mut run = Vec::new();
            let mut scratch = [[0f32; 32]; 2 * ROWS];
            // SAFETY: the caller vouches for `U`; every tile pointer below covers 16 rows of 64
            // bytes: A tiles and B tiles are whole (1 KiB) inside the packed buffers, C tiles
            // inside the 32 x 32 scratch (row stride 128 bytes).
            unsafe { unit.configure() };
            for j0 in cols.clone().step_by(PANEL_COLS) {
                let ncols = PANEL_COLS.min(cols.end - j0);
                let col_tiles = ncols.div_ceil(32) * 2;
                pack_weights(w, wb, j0, col_tiles, ksteps, &mut panel, &mut run);
                for cp in (0..col_tiles).step_by(2) {
                    let c_lo = j0 + 16 * cp;
                    let c_n = (n - c_lo).min(32);
                    let mut factor = [0f32; 32];
                    for (x, f) in factor.iter_mut().enumerate().take(c_n) {
                        *f = a.scale * col_scale(c_lo + x);
                    }
                    let mut write = |r0: usize, r_n: usize, acc: &[[f32; 32]]| {
                        for (r, acc) in acc.iter().enumerate().take(r_n) {
                            let dst = &mut rows[r0 + r][c_lo - cols.start..][..c_n];
                            for ((d, v), f) in dst.iter_mut().zip(acc).zip(&factor) {
                                *d = v * f;
                            }
                        }
                    };
                    match mode {
                        Mode::Single => {
                            for rt in (0..row_tiles).step_by(2) {
                                let r0 = rt * ROWS;
                                if r0 >= m {
                                    break;
                                }
                                // SAFETY: as above; the unit is configured.
                                unsafe {
                                    block_single(
                                        &mut unit,
                                        &a.hi,
                                        &panel,
                                        rt,
                                        cp,
                                        ksteps,
                                        &mut scratch,
                                    )
                                };
                                write(r0, (m - r0).min(2 * ROWS), &scratch);
                            }
                        }
                        Mode::Split => {
                            for rt in 0..row_tiles {
                                let r0 = rt * ROWS;
                                if r0 >= m {
                                    break;
                                }
                                // SAFETY: as above; the unit is configured.
                                unsafe {
                                    block_split(&mut unit, &a, &panel, rt, cp, ksteps, &mut scratch)
                                };
                                write(r0, (m - r0).min(ROWS), &scratch[..ROWS]);
                            }
                        }
                    }
                }
            }
            // SAFETY: as above.
            unsafe { unit.release() };
        });
    }
}

/// Address of tile `(t, ks)` in a packed buffer.
fn tile(buf: &[u16], t: usize, ks: usize, ksteps: usize) -> *const u8 {
    buf[(t * ksteps + ks) * ROWS * KSTEP..][..ROWS * KSTEP]
        .as_ptr()
        .cast()
}

/// 32 rows (A tiles `rt`, `rt + 1`) x 32 columns (B tiles `ct`, `ct + 1`) over every depth.
///
/// # Safety
/// As for [`gemm`]; the unit is configured.
unsafe fn block_single<U: TileUnit>(
    u: &mut U,
    a: &[u16],
    b: &[u16],
    rt: usize,
    ct: usize,
    ksteps: usize,
    c: &mut [[f32; 32]; 2 * ROWS],
) {
    u.zero::<0>();
    u.zero::<1>();
    u.zero::<2>();
    u.zero::<3>();
    for ks in 0..ksteps {
        u.load::<4>(tile(a, rt, ks, ksteps), ROW_BYTES);
        u.load::<5>(tile(a, rt + 1, ks, ksteps), ROW_BYTES);
        u.load::<6>(tile(b, ct, ks, ksteps), ROW_BYTES);
        u.load::<7>(tile(b, ct + 1, ks, ksteps), ROW_BYTES);
        u.dot::<0, 4, 6>();
        u.dot::<1, 4, 7>();
        u.dot::<2, 5, 6>();
        u.dot::<3, 5, 7>();
    }
    let p = c.as_mut_ptr().cast::<f32>();
    const STRIDE: usize = 32 * 4;
    u.store::<0>(p.cast(), STRIDE);
    u.store::<1>(p.add(16).cast(), STRIDE);
    u.store::<2>(p.add(16 * 32).cast(), STRIDE);
    u.store::<3>(p.add(16 * 32 + 16).cast(), STRIDE);
}

/// 16 rows (A tile `rt`, hi and lo) x 32 columns: `hi + lo`, or `hi` alone where it is not
/// finite (an infinite weight times a `lo` of 0 would turn the sum into NaN).
///
/// # Safety
/// As for [`gemm`]; the unit is configured.
unsafe fn block_split<U: TileUnit>(
    u: &mut U,
    a: &PackedLhs,
    b: &[u16],
    rt: usize,
    ct: usize,
    ksteps: usize,
    c: &mut [[f32; 32]; 2 * ROWS],
) {
    u.zero::<0>();
    u.zero::<1>();
    u.zero::<2>();
    u.zero::<3>();
    for ks in 0..ksteps {
        u.load::<4>(tile(&a.hi, rt, ks, ksteps), ROW_BYTES);
        u.load::<5>(tile(&a.lo, rt, ks, ksteps), ROW_BYTES);
        u.load::<6>(tile(b, ct, ks, ksteps), ROW_BYTES);
        u.load::<7>(tile(b, ct + 1, ks, ksteps), ROW_BYTES);
        u.dot::<0, 4, 6>();
        u.dot::<1, 4, 7>();
        u.dot::<2, 5, 6>();
        u.dot::<3, 5, 7>();
    }
    // hi in rows 0..16 of the scratch, lo in rows 16..32.
    let p = c.as_mut_ptr().cast::<f32>();
    const STRIDE: usize = 32 * 4;
    u.store::<0>(p.cast(), STRIDE);
    u.store::<1>(p.add(16).cast(), STRIDE);
    u.store::<2>(p.add(16 * 32).cast(), STRIDE);
    u.store::<3>(p.add(16 * 32 + 16).cast(), STRIDE);
    let (hi, lo) = c.split_at_mut(ROWS);
    for (h, l) in hi.iter_mut().zip(lo.iter()) {
        for (h, l) in h.iter_mut().zip(l) {
            if h.is_finite() {
                *h += l;
            }
        }
    }
}
