//! Which instruction-set level the kernels run at, decided once per process.
//!
//! Levels, lowest first: scalar, AVX2 (+FMA+F16C), AVX-512 (F/BW/VL), AMX (AMX-TILE +
//! AMX-BF16, with the tile state granted by the OS). [`Isa::supported`] is the best level this
//! CPU and OS offer; [`Isa::detect`] is the level the kernels use, with the reason
//! ([`Selection`]), which `fp8xla.info()` and the CLI banner print.
//!
//! `FP8XLA_ISA=scalar|avx2|avx512|amx` asks for a level (lowered to the supported one if the
//! machine lacks it, with the reason given). Without it the kernels run at most at
//! [`DEFAULT_MAX`]: the AVX-512 and AMX kernels are tested on every machine through software
//! models of their instructions, but their real instructions have not yet passed the test suite
//! on such hardware; until they have, they run only when asked for. Raising the default is a
//! one-line change here once `cargo test` has passed on an AVX-512 and on an AMX machine
//! (the tests run every supported level, whatever the default).
use once_cell::sync::Lazy;

/// Instruction-set levels the kernels are written for, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F + BW + VL (+ the AVX2 set).
    Avx512,
    /// AMX-TILE + AMX-BF16 (+ the AVX-512 set), tile state granted by the OS.
    Amx,
}

/// The highest level used when `FP8XLA_ISA` is not set (see the module documentation).
pub const DEFAULT_MAX: Isa = Isa::Avx2;

/// Every level, lowest first.
pub const LEVELS: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx];

/// Whether one level is available on this machine, and if not, why.
#[derive(Clone, Debug)]
pub struct Availability {
    pub isa: Isa,
    pub available: bool,
    /// Empty when available; else what is missing (e.g. "OS refused tile state").
    pub reason: String,
}

/// The level the kernels run at and why.
#[derive(Clone, Debug)]
pub struct Selection {
    pub chosen: Isa,
    /// The best level this machine supports.
    pub supported: Isa,
    /// One sentence on how `chosen` was decided.
    pub why: String,
    /// Every level with its availability.
    pub levels: Vec<Availability>,
}

static LEVEL_CHECKS: Lazy<Vec<Availability>> = Lazy::new(check_levels);

fn check_levels() -> Vec<Availability> {
    let mut out: Vec<Availability> = Vec::new();
    for isa in LEVELS {
        let below_ok = out.last().is_none_or(|a| a.available);
        // The level's own lack first (more telling: "CPU lacks AMX-TILE"), then the levels
        // below it, which it builds on.
        let reason = match missing(isa) {
            Err(why) => why,
            Ok(()) if !below_ok => format!("needs {}", out.last().map_or("", |a| a.isa.name())),
            Ok(()) => String::new(),
        };
        out.push(Availability {
            isa,
            available: reason.is_empty(),
            reason,
        });
    }
    out
}

/// What this machine lacks for `isa` alone (the levels below are checked separately).
fn missing(isa: Isa) -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        let lacks = |names: &[(&str, bool)]| {
            let gone: Vec<&str> = names.iter().filter(|n| !n.1).map(|n| n.0).collect();
            if gone.is_empty() {
                Ok(())
            } else {
                Err(format!("CPU lacks {}", gone.join(", ")))
            }
        };
        match isa {
            Isa::Scalar => Ok(()),
            Isa::Avx2 => lacks(&[
                ("AVX2", std::arch::is_x86_feature_detected!("avx2")),
                ("FMA", std::arch::is_x86_feature_detected!("fma")),
                ("F16C", std::arch::is_x86_feature_detected!("f16c")),
            ]),
            Isa::Avx512 => lacks(&[
                ("AVX512F", std::arch::is_x86_feature_detected!("avx512f")),
                ("AVX512BW", std::arch::is_x86_feature_detected!("avx512bw")),
                ("AVX512VL", std::arch::is_x86_feature_detected!("avx512vl")),
            ]),
            Isa::Amx => crate::kernels::amx_support(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    match isa {
        Isa::Scalar => Ok(()),
        _ => Err("not an x86-64 CPU".to_string()),
    }
}

static SELECTION: Lazy<Selection> =
    Lazy::new(|| select(std::env::var("FP8XLA_ISA").ok().as_deref()));

/// Decides the level from the value of `FP8XLA_ISA` (`None`: not set).
fn select(requested: Option<&str>) -> Selection {
    let levels = LEVEL_CHECKS.clone();
    let supported = Isa::supported();
    let reason_of = |isa: Isa| {
        levels
            .iter()
            .find(|a| a.isa == isa)
            .map_or(String::new(), |a| a.reason.clone())
    };
    let (chosen, why) = match requested.map(Isa::parse) {
        None => {
            let chosen = supported.min(DEFAULT_MAX);
            let why = if supported > DEFAULT_MAX {
                format!(
                    "{} by default; this machine also supports {} (FP8XLA_ISA={} enables it: \
                     its kernels have not yet been validated on such hardware)",
                    chosen.name(),
                    supported.name(),
                    supported.name()
                )
            } else if chosen < Isa::Amx {
                let next = LEVELS[chosen as usize + 1];
                format!(
                    "{}: best level of this machine ({}: {})",
                    chosen.name(),
                    next.name(),
                    reason_of(next)
                )
            } else {
                format!("{}: best level of this machine", chosen.name())
            };
            (chosen, why)
        }
        Some(Some(asked)) if asked <= supported => {
            (asked, format!("{}: requested by FP8XLA_ISA", asked.name()))
        }
        Some(Some(asked)) => (
            supported,
            format!(
                "{}: FP8XLA_ISA asked for {}, which this machine cannot run ({})",
                supported.name(),
                asked.name(),
                reason_of(asked)
            ),
        ),
        Some(None) => {
            let chosen = supported.min(DEFAULT_MAX);
            (
                chosen,
                format!(
                    "{}: FP8XLA_ISA={:?} is not one of scalar, avx2, avx512, amx and was ignored",
                    chosen.name(),
                    requested.unwrap_or_default()
                ),
            )
        }
    };
    Selection {
        chosen,
        supported,
        why,
        levels,
    }
}

impl Isa {
    /// The best level this CPU and OS support.
    pub fn supported() -> Isa {
        LEVEL_CHECKS
            .iter()
            .take_while(|a| a.available)
            .last()
            .map_or(Isa::Scalar, |a| a.isa)
    }

    /// Every level this machine can run, lowest first (tests compare all of them).
    pub fn all_supported() -> Vec<Isa> {
        LEVELS
            .into_iter()
            .filter(|&i| i <= Isa::supported())
            .collect()
    }

    /// The level the kernels use (see the module documentation).
    pub fn detect() -> Isa {
        SELECTION.chosen
    }

    /// [`Isa::detect`] with the reason and every level's availability.
    pub fn selection() -> &'static Selection {
        &SELECTION
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// The level named `name` (as `FP8XLA_ISA` spells it).
    pub fn parse(name: &str) -> Option<Isa> {
        LEVELS.into_iter().find(|i| i.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for isa in LEVELS {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("avx-512"), None);
        assert_eq!(Isa::parse(""), None);
    }

    #[test]
    fn the_request_decides_within_what_the_machine_supports() {
        let best = Isa::supported();
        assert_eq!(select(None).chosen, best.min(DEFAULT_MAX));
        for isa in LEVELS {
            let s = select(Some(isa.name()));
            assert_eq!(s.chosen, isa.min(best), "{}", s.why);
            if isa > best {
                assert!(s.why.contains("cannot run"), "{}", s.why);
            }
        }
        let s = select(Some("avx1024"));
        assert_eq!(s.chosen, best.min(DEFAULT_MAX));
        assert!(s.why.contains("\"avx1024\" is not one of"), "{}", s.why);
    }

    #[test]
    fn every_unavailable_level_says_why() {
        let levels = &Isa::selection().levels;
        assert_eq!(levels.len(), LEVELS.len());
        for a in levels {
            assert_eq!(a.available, a.isa <= Isa::supported());
            assert_eq!(a.available, a.reason.is_empty(), "{a:?}");
        }
        println!("kernel levels on this machine: {levels:?}");
    }
}
