//! One table of kernels per instruction-set level, chosen once ([`Kernels::for_isa`]).
//!
//! The drivers in `kernels/mod.rs` (task splitting, packing, blocking) call the microkernels
//! through the table's function pointers and never look at the ISA again. A level's table is
//! the one below it with the entries it improves replaced: AVX-512 replaces the FP8 GEMVs of
//! AVX2, AMX adds the bf16 tile GEMM. The tables of the vector levels are only handed out
//! when the CPU has their instructions (each module's `table()` checks), which is what makes
//! their entries safe to call.
//!
//! Tests also build tables whose microkernels run on software models of the AVX-512 and AMX
//! instructions ([`Kernels::models`]), so those drivers run on every CPU.
use super::{scalar, Lhs, Mul, NR};
use crate::cpu::Isa;
use crate::fp8::Format;
use crate::parallel::Parallel;

/// `out[r*os + c] = mul(c) * sum_kk lhs[r*k + kk] * w[c*k + kk]` for `r < rows <= 4`,
/// `c < ncols` (FP8 NK weights, in the table's domain).
pub(crate) type GemvNk = fn(Format, &[f32], usize, usize, &[u8], usize, &mut [f32], usize, Mul);
/// `acc[r*ncols + c] = sum_kk lhs[r*ls + kk] * w[kk*ncols + c]` for `kk < kr` (FP8 KN rows).
pub(crate) type KnRows = fn(Format, &[f32], usize, usize, usize, &[u8], usize, &mut [f32]);
/// [`GemvNk`] for float32 weights, without a column factor.
pub(crate) type GemvNkF32 = fn(&[f32], usize, usize, &[f32], usize, &mut [f32], usize);
/// [`KnRows`] for float32 weights.
pub(crate) type KnRowsF32 = fn(&[f32], usize, usize, usize, &[f32], usize, &mut [f32]);
/// Packs `NR` consecutive KN columns of `kc` rows at stride `ws` into `dst[kk*NR + x]`.
pub(crate) type PackKn = fn(Format, &[u8], usize, usize, &mut [f32]);
/// Packs depths `pc..pc+kc` of `cols <= NR` NK columns into `dst[kk*NR + x]` (zero-filled).
pub(crate) type PackNk = fn(Format, &[u8], usize, usize, usize, usize, &mut [f32]);
/// The f32 GEMM microkernel (see `kernels::micro`).
pub(crate) type Micro = fn(
    &[f32],
    usize,
    usize,
    usize,
    &[f32],
    &mut [&mut [f32]],
    usize,
    usize,
    bool,
    Option<&[f32; NR]>,
);
/// A whole FP8 matmul on bf16 tiles (see `kernels::amx`): `out = lhs · decode(w) · scale`.
pub(crate) type TileGemm =
    fn(&dyn Parallel, &Lhs, usize, &super::Fp8Weights, super::WeightScale, &mut [f32]);

/// The kernels of one level.
pub(crate) struct Kernels {
    /// The level these kernels need.
    pub(crate) isa: Isa,
    /// What each product runs on, for `fp8xla.info()` (e.g. "avx512 16-lane FMA").
    pub(crate) gemv_name: &'static str,
    pub(crate) gemm_name: &'static str,
    /// The e4m3fn weights are handled as `value / e4m3_unit` (the f16 widening of the vector
    /// levels divides by 2^8 exactly); the unit is folded into the per-column factor.
    pub(crate) e4m3_unit: f32,
    pub(crate) gemv_nk: GemvNk,
    pub(crate) kn_rows: KnRows,
    pub(crate) gemv_nk_f32: GemvNkF32,
    pub(crate) kn_rows_f32: KnRowsF32,
    /// Vector packers for the common panels (the generic table packer does the rest).
    pub(crate) pack_kn: Option<PackKn>,
    pub(crate) pack_nk: Option<PackNk>,
    pub(crate) micro: Micro,
    /// The tile GEMM, used from [`Kernels::tile_min_rows`] lhs rows on.
    pub(crate) tile_gemm: Option<TileGemm>,
    pub(crate) tile_min_rows: usize,
}

/// The portable table: plain loops over exactly decoded weights.
pub(crate) static SCALAR: Kernels = Kernels {
    isa: Isa::Scalar,
    gemv_name: "scalar",
    gemm_name: "scalar 6x16 f32",
    e4m3_unit: 1.0,
    gemv_nk: |fmt, lhs, rows, k, w, ncols, out, os, mul| {
        let tab = super::table(fmt);
        scalar::gemv_nk(
            |q: u8| tab[q as usize],
            lhs,
            rows,
            k,
            w,
            ncols,
            out,
            os,
            mul,
        )
    },
    kn_rows: |fmt, lhs, ls, rows, kr, w, ncols, acc| {
        let tab = super::table(fmt);
        scalar::kn_rows(|q: u8| tab[q as usize], lhs, ls, rows, kr, w, ncols, acc)
    },
    gemv_nk_f32: |lhs, rows, k, w, ncols, out, os| {
        scalar::gemv_nk(|x| x, lhs, rows, k, w, ncols, out, os, Mul::ONE)
    },
    kn_rows_f32: |lhs, ls, rows, kr, w, ncols, acc| {
        scalar::kn_rows(|x| x, lhs, ls, rows, kr, w, ncols, acc)
    },
    pack_kn: None,
    pack_nk: None,
    micro: scalar::micro,
    tile_gemm: None,
    tile_min_rows: usize::MAX,
};

impl Kernels {
    /// The table of `isa`, which this machine must support (levels are checked once, in
    /// `crate::cpu`). Panics otherwise: callers pass `Isa::detect()` or a level from
    /// `Isa::all_supported()`.
    pub(crate) fn for_isa(isa: Isa) -> &'static Kernels {
        assert!(
            isa <= Isa::supported(),
            "kernels: {} is not supported by this machine",
            isa.name()
        );
        #[cfg(target_arch = "x86_64")]
        {
            let table = match isa {
                Isa::Scalar => None,
                Isa::Avx2 => super::avx2::table(),
                Isa::Avx512 => super::avx512::table(),
                Isa::Amx => super::amx::table(),
            };
            if let Some(t) = table {
                return t;
            }
        }
        &SCALAR
    }

    /// The e4m3fn / e5m2 decode table of this table's domain, and the factor back to values.
    pub(crate) fn domain(&self, fmt: Format) -> (&'static [f32; 256], f32) {
        match fmt {
            Format::E4m3fn if self.e4m3_unit != 1.0 => (&super::E4M3_SCALED, self.e4m3_unit),
            f => (super::table(f), 1.0),
        }
    }

    /// One line on what runs where, e.g. for `fp8xla.info()`.
    pub(crate) fn describe(&self) -> String {
        let mut s = format!(
            "GEMV (m <= {}): {}; GEMM: {}",
            super::GEMV_MAX_M,
            self.gemv_name,
            self.gemm_name
        );
        if self.tile_gemm.is_some() {
            s += &format!(
                "; from m >= {}: AMX bf16 tiles (FP8 weights widened to bf16 while packing)",
                self.tile_min_rows
            );
        }
        s
    }

    /// Tables whose AVX-512 GEMVs and AMX tile GEMM run on software models of those
    /// instructions, on top of the scalar table: the drivers, packing, tiling, edges and
    /// epilogues of those levels, testable on any CPU. (The model GEMVs widen e4m3fn as the
    /// hardware does, so their table uses the scaled domain.)
    #[cfg(test)]
    pub(crate) fn models() -> [&'static Kernels; 2] {
        [&super::wide::MODEL_TABLE, &super::amx::MODEL_TABLE]
    }
}
