/* fp8xla: C declarations of every symbol the fp8xla shared library exports.
 *
 * Handlers follow XLA's typed FFI: each takes an XLA_FFI_CallFrame* and returns NULL on
 * success or an XLA_FFI_Error* (see xla/ffi/api/c_api.h). The name of each handler is also its
 * custom-call target name; fp8xla_targets() lists them. Register them for platform "cpu",
 * e.g. from Python:
 *   jax.ffi.register_ffi_target("fp8xla_qdq", jax.ffi.pycapsule(lib.fp8xla_qdq), platform="cpu")
 * Their contracts (operands, results, attributes, numerics) are in docs/custom-calls.md.
 */
#ifndef FP8XLA_H_
#define FP8XLA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct XLA_FFI_CallFrame;
struct XLA_FFI_Error;

/* Custom-call handlers (contracts: docs/custom-calls.md). */
struct XLA_FFI_Error* fp8xla_quantize(struct XLA_FFI_CallFrame* frame);     /* x -> FP8 codes */
struct XLA_FFI_Error* fp8xla_dequantize(struct XLA_FFI_CallFrame* frame);   /* FP8 codes -> x */
struct XLA_FFI_Error* fp8xla_qdq(struct XLA_FFI_CallFrame* frame);          /* fake quantization */
struct XLA_FFI_Error* fp8xla_observe(struct XLA_FFI_CallFrame* frame);      /* calibration */
struct XLA_FFI_Error* fp8xla_matmul(struct XLA_FFI_CallFrame* frame);       /* FP8-weight dot */
struct XLA_FFI_Error* fp8xla_dot_f32(struct XLA_FFI_CallFrame* frame);      /* f32 GEMV dot */
struct XLA_FFI_Error* fp8xla_take(struct XLA_FFI_CallFrame* frame);         /* FP8 row lookup */
struct XLA_FFI_Error* fp8xla_update_slice(struct XLA_FFI_CallFrame* frame); /* in place */
struct XLA_FFI_Error* fp8xla_quantize_rows(struct XLA_FFI_CallFrame* frame); /* row scales */
struct XLA_FFI_Error* fp8xla_argmax(struct XLA_FFI_CallFrame* frame);       /* argmax, last dim */

/* The custom-call targets this library exports (the handlers above), each name followed by
 * '\n', as one static NUL-terminated string owned by the library (do not free it). */
const char* fp8xla_targets(void);

/* Number of sites fp8xla_observe has recorded since the last reset. */
int64_t fp8xla_observer_num_sites(void);
/* Copies up to `capacity` sites sorted by id: id, largest finite |x|, elements seen, and
 * NaN/inf elements seen. NULL pointers skip a column. Returns the number of sites written. */
int64_t fp8xla_observer_read(int64_t* sites, float* amax, int64_t* count, int64_t* nonfinite,
                             int64_t capacity);
/* Forgets every recorded site. */
void fp8xla_observer_reset(void);

/* Runs a graph-rewrite pass by name ("quantize", "instrument", "update_slices_in_place",
 * "decode_dots", "sampler_argmax" or "shard_calls"; see src/rewrite/registry.rs) over
 * StableHLO text (MLIR generic form) with JSON options. Returns 0 and sets *out_module and *out_report (JSON) on success;
 * returns 1 (the pass refused the module or options) or 2 (bad arguments, internal error) and
 * sets *out_report to the message and *out_module to NULL otherwise. Free both with
 * fp8xla_free_string. */
int32_t fp8xla_rewrite(const char* pass, const char* module, const char* options_json,
                       char** out_module, char** out_report);
/* Frees a string returned by fp8xla_rewrite (NULL is ignored). */
void fp8xla_free_string(char* s);

/* Instruction set the kernels use on this CPU: 0 scalar, 1 AVX2+FMA+F16C, 2 AVX-512, 3 AMX. */
int32_t fp8xla_isa_level(void);

/* What the kernels run on this machine and why, as one JSON object (keys "isa", "supported",
   "why", "kernels", "levels"): a static string owned by the library, not to be freed. */
const char *fp8xla_kernel_info(void);

#ifdef __cplusplus
}
#endif

#endif /* FP8XLA_H_ */
