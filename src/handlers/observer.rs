//! `fp8xla_observe`: identity that records max|x| per calibration site, and the registry the
//! C API reads. NaN and infinities are counted, not folded into the maximum, so one bad
//! activation is visible instead of silently turning a scale into NaN.
//! Contract: docs/custom-calls.md.
use super::{par_map, same_type_result};
use crate::xla_ffi::{Call, DataType, FfiError};
use half::bf16;
use once_cell::sync::Lazy;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// What one site has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SiteStat {
    /// Largest finite |x|.
    pub amax: f32,
    /// Elements seen.
    pub count: u64,
    /// Elements that were NaN or ±inf.
    pub nonfinite: u64,
}

impl SiteStat {
    fn merge(&mut self, other: SiteStat) {
        self.amax = self.amax.max(other.amax);
        self.count += other.count;
        self.nonfinite += other.nonfinite;
    }

    fn of(values: impl Iterator<Item = f32>) -> SiteStat {
        let mut s = SiteStat::default();
        for v in values {
            s.count += 1;
            if v.is_finite() {
                s.amax = s.amax.max(v.abs());
            } else {
                s.nonfinite += 1;
            }
        }
        s
    }
}

static SITES: Lazy<Mutex<BTreeMap<i64, SiteStat>>> = Lazy::new(|| Mutex::new(BTreeMap::new()));

fn sites() -> std::sync::MutexGuard<'static, BTreeMap<i64, SiteStat>> {
    SITES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Adds what a call saw to `site`.
pub fn record(site: i64, stat: SiteStat) {
    sites().entry(site).or_default().merge(stat);
}

/// All sites, sorted by id.
pub fn snapshot() -> Vec<(i64, SiteStat)> {
    sites().iter().map(|(k, v)| (*k, *v)).collect()
}

/// Forgets all sites.
pub fn reset() {
    sites().clear();
}

/// The `fp8xla_observe` custom call (identity that records statistics under `site`).
pub fn observe(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[1], 1)?;
    call.attrs().reject_unknown(&["site"])?;
    let site = call.attrs().i64("site")?;
    let x_dtype = call.arg(0)?.dtype();
    let y = same_type_result(call)?;
    let total = Mutex::new(SiteStat::default());
    let add = |s: SiteStat| total.lock().unwrap_or_else(|p| p.into_inner()).merge(s);
    let pool = call.pool();
    match x_dtype {
        DataType::F32 => {
            let src = call.arg(0)?.slice::<f32>("operand 0 (x)")?;
            let dst = y.into_slice::<f32>("result 0 (y)")?;
            par_map(pool, src, dst, |s, d| {
                d.copy_from_slice(s);
                add(SiteStat::of(s.iter().copied()));
            });
        }
        DataType::Bf16 => {
            let src = call.arg(0)?.slice::<bf16>("operand 0 (x)")?;
            let dst = y.into_slice::<bf16>("result 0 (y)")?;
            par_map(pool, src, dst, |s, d| {
                d.copy_from_slice(s);
                add(SiteStat::of(s.iter().map(|v| v.to_f32())));
            });
        }
        other => {
            return Err(FfiError::invalid(format!(
                "operand 0 (x): expected dtype float32 or bfloat16, got {}",
                other.name()
            )))
        }
    }
    record(site, total.into_inner().unwrap_or_else(|p| p.into_inner()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ignores_nonfinite_in_max() {
        let s = SiteStat::of([1.0f32, -3.5, f32::NAN, f32::NEG_INFINITY, 2.0].into_iter());
        assert_eq!(s.amax, 3.5);
        assert_eq!(s.count, 5);
        assert_eq!(s.nonfinite, 2);
    }
}
