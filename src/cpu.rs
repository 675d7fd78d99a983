//! Which vector instructions this CPU offers, detected once at run time. Kernels pick their
//! implementation from `Isa::detect()`; `FP8XLA_ISA=scalar|avx2` caps the choice (for
//! benchmarks and for testing every path on one machine).
//!
//! The AVX-512 conversions have not yet run on AVX-512 hardware (the development and CI
//! machines have AVX2 only), so by default they are not dispatched to: `FP8XLA_ISA=avx512` opts
//! in. The test suite runs every level the CPU supports regardless, so `cargo test` on an
//! AVX-512 machine validates them.
use once_cell::sync::Lazy;

/// Instruction-set levels the kernels are written for, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F + BW + VL (+ the AVX2 set).
    Avx512,
}

impl Isa {
    /// The best level this CPU supports.
    pub fn supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl");
            if avx512 {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every level this CPU can run, lowest first (tests compare all of them).
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i <= Isa::supported())
            .collect()
    }

    /// The level kernels use: the supported one up to AVX2, or as `FP8XLA_ISA` says.
    pub fn detect() -> Isa {
        static CHOSEN: Lazy<Isa> = Lazy::new(|| {
            let best = Isa::supported();
            match std::env::var("FP8XLA_ISA").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx512") => best,
                _ => best.min(Isa::Avx2),
            }
        });
        *CHOSEN
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}
