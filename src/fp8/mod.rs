//! FP8 formats e4m3fn and e5m2: scalar and vectorized conversions.
