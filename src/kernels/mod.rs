//! Compute kernels (FP8 matmul).
