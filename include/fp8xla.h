/* fp8xla: C declarations of every symbol the fp8xla shared library exports.
 *
 * Handlers follow XLA's typed FFI: each takes an XLA_FFI_CallFrame* and returns NULL on
 * success or an XLA_FFI_Error* (see xla/ffi/api/c_api.h). Register them for platform "cpu",
 * e.g. from Python:
 *   jax.ffi.register_ffi_target("fp8xla_qdq", jax.ffi.pycapsule(lib.fp8xla_qdq), platform="cpu")
 * The contracts (operands, results, attributes) are documented in README.md.
 */
#ifndef FP8XLA_H_
#define FP8XLA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct XLA_FFI_CallFrame;
struct XLA_FFI_Error;

/* x: f32|bf16 -> q: f8e4m3fn|f8e5m2 (format = result type); attribute scale (f32 > 0). */
struct XLA_FFI_Error* fp8xla_quantize(struct XLA_FFI_CallFrame* frame);
/* q: f8e4m3fn|f8e5m2 -> x: f32|bf16; attribute scale. */
struct XLA_FFI_Error* fp8xla_dequantize(struct XLA_FFI_CallFrame* frame);
/* x -> x (f32|bf16), fused quantize+dequantize; attributes scale, format ("e4m3fn"|"e5m2"). */
struct XLA_FFI_Error* fp8xla_qdq(struct XLA_FFI_CallFrame* frame);
/* x -> x (f32|bf16), identity recording max|x| under attribute site (i64). */
struct XLA_FFI_Error* fp8xla_observe(struct XLA_FFI_CallFrame* frame);

/* lhs: f32|bf16 activations, rhs: f8e4m3fn|f8e5m2 weights, [w_scale: f32 per-channel scales]
 * -> f32|bf16 = dot_general(qdq(lhs, a_scale) or lhs, f32(rhs) * w_scale), f32 accumulation.
 * Attributes: lhs_contracting_dims, rhs_contracting_dims (i64 arrays), lhs_batching_dims,
 * rhs_batching_dims (optional), w_scale (f32, per tensor, unless operand 2 is given),
 * a_scale (optional f32), a_format (optional, default: the weights' format). */
struct XLA_FFI_Error* fp8xla_matmul(struct XLA_FFI_CallFrame* frame);
/* lhs: f32, rhs: f32 -> f32 = dot_general(lhs, rhs), for few rows against a large operand
 * (the larger one, rhs on a tie, is streamed once by GEMV kernels and must be laid out as
 * [batch dims, free dims, contracting dims, free dims] once its size-1 dims are dropped).
 * Attributes: lhs_contracting_dims, rhs_contracting_dims (i64 arrays), lhs_batching_dims,
 * rhs_batching_dims (optional). */
struct XLA_FFI_Error* fp8xla_dot_f32(struct XLA_FFI_CallFrame* frame);
/* table: f8e4m3fn|f8e5m2 [rows, ...], indices: s32|s64 [batch...] or [batch..., 1]
 * -> f32|bf16 [batch..., row dims...] = f32(table[clamp(i, 0, rows-1)]) * scale
 * (an embedding lookup); attribute scale. */
struct XLA_FFI_Error* fp8xla_take(struct XLA_FFI_CallFrame* frame);
/* operand (pred, s8, u8, s32, s64, f16, bf16, f32, f64, f8e4m3fn or f8e5m2; rank r),
 * update (same dtype and rank, dims <= operand's), r scalar
 * start indices (s32|s64) -> the operand with update written at the start indices, each
 * clamped to [0, operand_dim - update_dim] (stablehlo.dynamic_update_slice). Result 0 must
 * alias operand 0 (output_operand_aliases): the update is done in place. No attributes. */
struct XLA_FFI_Error* fp8xla_update_slice(struct XLA_FFI_CallFrame* frame);

/* Number of sites fp8xla_observe has recorded since the last reset. */
int64_t fp8xla_observer_num_sites(void);
/* Copies up to `capacity` sites sorted by id: id, largest finite |x|, elements seen, and
 * NaN/inf elements seen. NULL pointers skip a column. Returns the number of sites written. */
int64_t fp8xla_observer_read(int64_t* sites, float* amax, int64_t* count, int64_t* nonfinite,
                             int64_t capacity);
/* Forgets every recorded site. */
void fp8xla_observer_reset(void);

/* Runs a graph-rewrite pass ("quantize" or "instrument") over StableHLO text (MLIR generic
 * form) with JSON options. Returns 0 and sets *out_module and *out_report (JSON) on success;
 * returns 1 (the pass refused the module or options) or 2 (bad arguments, internal error) and
 * sets *out_report to the message and *out_module to NULL otherwise. Free both with
 * fp8xla_free_string. */
int32_t fp8xla_rewrite(const char* pass, const char* module, const char* options_json,
                       char** out_module, char** out_report);
/* Frees a string returned by fp8xla_rewrite (NULL is ignored). */
void fp8xla_free_string(char* s);

/* Instruction set the kernels use on this CPU: 0 scalar, 1 AVX2+FMA+F16C, 2 AVX-512. */
int32_t fp8xla_isa_level(void);

#ifdef __cplusplus
}
#endif

#endif /* FP8XLA_H_ */
