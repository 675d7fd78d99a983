//! The AMX tile operations the tile GEMM uses, as a trait: the hardware runs them through
//! `asm!` (`hw.rs`), [`TileModel`] computes them in plain Rust from the Intel SDM's
//! definitions, so the GEMM's packing, tiling, edges and epilogue run on every CPU.
//!
//! Every tile is configured as 16 rows of 64 bytes (palette 1): an A tile holds 16 rows of 32
//! bf16, a B tile 16 rows of 16 bf16 pairs (row `p`, pair `x`: depths `2p` and `2p+1` of
//! column `x`, the "VNNI" order), a C tile 16 x 16 float32.

/// Rows of every tile.
pub(crate) const ROWS: usize = 16;
/// Bytes of every tile row.
pub(crate) const ROW_BYTES: usize = 64;

/// The tile operations, on tiles named by number (0..8).
///
/// # Safety
/// Implementations may use instructions the CPU lacks: callers guarantee they are available,
/// that [`TileUnit::configure`] ran on this thread first, and that every pointer covers 16
/// rows of 64 bytes at the given stride.
pub(crate) unsafe trait TileUnit: Default {
    /// Loads the tile configuration (every tile 16 x 64 bytes) on this thread.
    unsafe fn configure(&mut self);
    /// Releases the tile state of this thread.
    unsafe fn release(&mut self);
    unsafe fn zero<const T: u8>(&mut self);
    unsafe fn load<const T: u8>(&mut self, p: *const u8, stride: usize);
    /// `C += A · B` on bf16 pairs with float32 accumulation (`tdpbf16ps`).
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self);
    unsafe fn store<const T: u8>(&mut self, p: *mut u8, stride: usize);
}

/// The tile configuration `ldtilecfg` reads: palette 1, tiles 0..8 of 16 rows x 64 bytes.
pub(crate) fn config() -> [u8; 64] {
    let mut cfg = [0u8; 64];
    cfg[0] = 1; // palette
    for t in 0..8 {
        cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&(ROW_BYTES as u16).to_le_bytes());
        cfg[48 + t] = ROWS as u8;
    }
    cfg
}

/// Eight tiles of 16 rows x 16 dwords, and the operations on them as the Intel SDM defines
/// them.
///
/// `tdpbf16ps`: for each C row `m` and column `n`, for each dword `k` of the A row, two
/// float32 fused multiply-adds in order, `c += a.bf16[2k] * b[k].bf16[2n]` then
/// `c += a.bf16[2k+1] * b[k].bf16[2n+1]`, each rounded to nearest even; bf16 inputs that are
/// subnormal count as zero (DAZ) and subnormal results are flushed to zero (FTZ), whatever the
/// MXCSR says. (A bf16 product is exact in float32, so each step is one rounding.)
#[cfg(test)]
#[derive(Default)]
pub(crate) struct TileModel {
    tiles: [[[u32; 16]; ROWS]; 8],
    configured: bool,
}

#[cfg(test)]
fn daz_bf16(bits: u16) -> f32 {
    let x = f32::from_bits((bits as u32) << 16);
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

#[cfg(test)]
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

// SAFETY: plain Rust; the pointer contracts are the trait's.
#[cfg(test)]
unsafe impl TileUnit for TileModel {
    unsafe fn configure(&mut self) {
        self.configured = true;
    }
    unsafe fn release(&mut self) {
        self.configured = false;
        self.tiles = Default::default();
    }
    unsafe fn zero<const T: u8>(&mut self) {
        assert!(self.configured, "tile model: tilezero before ldtilecfg");
        self.tiles[T as usize] = Default::default();
    }
    unsafe fn load<const T: u8>(&mut self, p: *const u8, stride: usize) {
        assert!(self.configured, "tile model: tileloadd before ldtilecfg");
        for (r, row) in self.tiles[T as usize].iter_mut().enumerate() {
            for (d, word) in row.iter_mut().enumerate() {
                let mut b = [0u8; 4];
                // SAFETY: the caller guarantees 16 rows of 64 bytes at `stride`.
                unsafe {
                    std::ptr::copy_nonoverlapping(p.add(r * stride + 4 * d), b.as_mut_ptr(), 4)
                };
                *word = u32::from_le_bytes(b);
            }
        }
    }
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        assert!(self.configured, "tile model: tdpbf16ps before ldtilecfg");
        assert!(
            C != A && C != B && A != B,
            "tile model: tdpbf16ps needs distinct tiles"
        );
        let (a, b) = (self.tiles[A as usize], self.tiles[B as usize]);
        let c = &mut self.tiles[C as usize];
        for m in 0..ROWS {
            for n in 0..16 {
                let mut acc = f32::from_bits(c[m][n]);
                for k in 0..16 {
                    let (aw, bw) = (a[m][k], b[k][n]);
                    let (a0, a1) = (daz_bf16(aw as u16), daz_bf16((aw >> 16) as u16));
                    let (b0, b1) = (daz_bf16(bw as u16), daz_bf16((bw >> 16) as u16));
                    acc = ftz(a0.mul_add(b0, acc));
                    acc = ftz(a1.mul_add(b1, acc));
                }
                c[m][n] = acc.to_bits();
            }
        }
    }
    unsafe fn store<const T: u8>(&mut self, p: *mut u8, stride: usize) {
        assert!(self.configured, "tile model: tilestored before ldtilecfg");
        for (r, row) in self.tiles[T as usize].iter().enumerate() {
            for (d, word) in row.iter().enumerate() {
                let b = word.to_le_bytes();
                // SAFETY: the caller guarantees 16 rows of 64 bytes at `stride`.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p.add(r * stride + 4 * d), 4) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The model's `tdpbf16ps` on one small hand-checked case: 1·2 + 3·4 over the first pair,
    /// and DAZ of a subnormal input.
    #[test]
    fn dot_follows_the_definition() {
        let mut u = TileModel::default();
        let mut a = [0u16; 16 * 32];
        let mut b = [0u16; 16 * 32];
        let h = |x: f32| bf16::from_f32(x).to_bits();
        // A row 0, depths 0 and 1; B row 0 (depth pair 0), column 0.
        a[0] = h(1.0);
        a[1] = h(3.0);
        b[0] = h(2.0);
        b[1] = h(4.0);
        // A row 1 depth 0: a subnormal bf16 (counts as 0); B column 1 depth 0.
        a[32] = 0x0001;
        b[2] = h(1.0);
        a[33] = h(5.0);
        b[3] = h(7.0);
        let mut c = [0f32; 256];
        // SAFETY: the buffers hold 16 rows of 64 bytes.
        unsafe {
            u.configure();
            u.zero::<0>();
            u.load::<1>(a.as_ptr().cast(), 64);
            u.load::<2>(b.as_ptr().cast(), 64);
            u.dot::<0, 1, 2>();
            u.store::<0>(c.as_mut_ptr().cast(), 64);
            u.release();
        }
        assert_eq!(c[0], 14.0, "row 0, column 0: 1·2 + 3·4");
        assert_eq!(c[1], 22.0, "row 0, column 1: 1·1 + 3·7");
        assert_eq!(c[16], 20.0, "row 1, column 0: 0·2 + 5·4 (subnormal as 0)");
        assert_eq!(c[16 + 1], 35.0, "row 1, column 1: 0·1 + 5·7");
        assert_eq!(c[2], 0.0);
    }
}
