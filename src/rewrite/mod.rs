//! StableHLO graph rewrite: parser, printer, and the passes, run as a pipeline.
//!
//! # Passes and the pipeline
//!
//! [`run_pass`] runs a pass by name ([`PASSES`]); `fp8xla_rewrite`, the `fp8xla-rewrite` tool
//! and `fp8xla.graph.run_pass` go through it. Each takes the module text and JSON options and
//! returns the rewritten module and a JSON report:
//!
//! | name | what it does | options |
//! | --- | --- | --- |
//! | `quantize` | FP8 weights: the pipeline below | see below |
//! | `instrument` | `fp8xla_observe` on every weight matmul's activation | see below |
//! | `update_slices_in_place` | loop-carried `dynamic_update_slice` → `fp8xla_update_slice` ([`inplace`]) | `{}` |
//! | `decode_dots` | decode-shaped float32 `dot_general` → `fp8xla_dot_f32` ([`decode_dot`]) | `{"min_bytes": 65536}` (optional) |
//! | `fp8_kv_cache` | a decode loop's float32 KV caches carried as FP8 codes with per-row scales ([`kv_cache`]) | `{"format": "e4m3fn"}` |
//! | `sampler_argmax` | `jnp.argmax` over a large last dim → `fp8xla_argmax` ([`sampler`]) | `{"min_size": 16384}` (optional) |
//! | `shard_calls` | fp8xla calls on sharded operands → `sdy.manual_computation` ([`shard`]) | `{"entry": "main"}` (optional) |
//!
//! A run ([`pipeline`]) parses and verifies the module, then runs its passes in order, each a
//! [`pipeline::Pass`], and [`verify`]s the module after each: a pass that leaves it
//! inconsistent is named in the error (stage `verify`, "…after pass `quantize_gathers`…").
//! `quantize` follows the weights (the step `follow_weights`) and then runs
//! `quantize_dots`, `fold_transposes`, `quantize_gathers`, `dequantize_other_uses`,
//! `update_slices_in_place`, `decode_dots`, `sampler_argmax` and `shard_calls` ([`quantize`]
//! says what each does). The run alone of `update_slices_in_place`, `decode_dots`,
//! `sampler_argmax` or `shard_calls` reports
//! `{"pass": name, "handled": [...]}` (entries as in `quantize`'s report).
//!
//! Options are JSON objects read with serde (`options.rs`): unknown keys are refused, and each
//! error names the key (e.g. `weights[0].w_scale`), what was expected and what came.
//!
//! The rules of the dot custom calls' dimension numbers live in [`crate::layout`], which both
//! the handlers and the planners of `quantize_dots` and `decode_dots` use: the rewrite emits
//! no call whose layout the handler would refuse.
//!
//! # Input form
//!
//! The passes read (and print) modules in MLIR's **generic** operation form with debug info, as
//! jaxlib's MLIR bindings print them:
//! `module.operation.get_asm(enable_debug_info=True, print_generic_op_form=True)`.
//! Every op then has one uniform syntax,
//! `%r = "dialect.op"(%a, %b) <{properties}> ({regions}) {attributes} : (types) -> types loc(..)`,
//! so the parser needs no knowledge of each op's pretty syntax, and nothing (attributes,
//! locations, alias definitions) is lost; jaxlib's `ir.Module.parse` and
//! `jax.extend.mlir.serialize_portable_artifact` accept the generic text as they accept the
//! pretty one. Parsing then printing reproduces MLIR's output byte for byte (the printer uses
//! MLIR's layout: two spaces per nesting level, one op per line).
//!
//! Weights are keyed on the **argument index** of the entry function (`main`), never on SSA
//! names. A weight is followed through `stablehlo.while` loops that carry it unchanged, into
//! private functions through `func.call` (the callee is cloned when it is also called from
//! elsewhere) and through a `transpose` that only feeds `dot_general`s (tied logits).
//!
//! # `quantize` options
//!
//! ```json
//! {
//!   "weights": [
//!     {"arg": 5, "format": "e4m3fn", "w_scale": 0.0123, "a_scale": 0.05},
//!     {"arg": 13, "format": "e5m2", "w_scale": [0.1, 0.2], "channel_dim": 1}
//!   ],
//!   "a_scales": {"3": 0.02},
//!   "skip_sites": [7],
//!   "skip_args": [2],
//!   "strict": false,
//!   "update_slices_in_place": true,
//!   "decode_dots": true,
//!   "decode_dots_min_bytes": 65536,
//!   "kv_cache": "e4m3fn",
//!   "sampler_argmax": true,
//!   "sampler_argmax_min_size": 16384,
//!   "entry": "main",
//!   "args": [{"index": 5, "path": "decoder_block_0/attention/query/kernel"}]
//! }
//! ```
//!
//! - `weights` (required): entry arguments to make FP8. `format`: `"e4m3fn"` or `"e5m2"` (also
//!   INC's names, see [`crate::fp8::Format::parse`]). `w_scale`: a number (per-tensor) or an
//!   array (per-channel, one scale per index of weight dimension `channel_dim`, which must then
//!   be a free — not contracted, not batched — dimension at every matmul; a per-row embedding,
//!   `channel_dim` 0, makes its lookups `fp8xla_take` with the row scales). `a_scale`
//!   (optional): activation scale for every matmul on this weight. `a_dynamic` (optional,
//!   `true` excludes `a_scale`): per-row activation scales at run time (`fp8xla_matmul`'s
//!   `a_dynamic`).
//! - `a_scales` (optional): activation scale per site number (overrides the weight's `a_scale`;
//!   ignored for a weight with `a_dynamic`).
//! - `skip_sites`: sites left as float `dot_general` (their weight operand is dequantized).
//! - `skip_args`: arguments left in float. They still count for site numbering, so sites agree
//!   with `instrument` run with `weights` = the union of both lists.
//! - `strict`: error instead of dequantizing a whole weight at a use the pass cannot keep FP8.
//! - `update_slices_in_place` (default `true`): whether the pass `update_slices_in_place` runs
//!   after the quantize passes (KV-cache updates of a decode loop become the in-place
//!   `fp8xla_update_slice`).
//! - `decode_dots` (default `true`): whether the pass `decode_dots` runs last (float32 products
//!   of a few rows with a large operand, such as attention over the KV cache, become
//!   `fp8xla_dot_f32`); `decode_dots_min_bytes` (default 65536): the least size of that large
//!   operand.
//! - `kv_cache` (default `null`): the FP8 format (`"e4m3fn"` or `"e5m2"`) of the decode
//!   loop's KV caches; the pass `fp8_kv_cache` then runs before `update_slices_in_place`
//!   ([`kv_cache`]; caches it cannot keep FP8 are reported with kind `kv_cache_float`).
//! - `sampler_argmax` (default `true`): whether the pass `sampler_argmax` runs after
//!   `decode_dots` (the greedy sampler's `argmax` over the vocabulary becomes the
//!   multi-threaded `fp8xla_argmax`, same results); `sampler_argmax_min_size` (default 16384):
//!   the least size of the reduced (last) dim.
//! - `shard_calls` (default `true`): whether the pass `shard_calls` runs last (fp8xla calls on
//!   operands the module shards over a mesh run per shard; nothing happens without a mesh).
//! - `entry` (default `"main"`), `args` (optional, the sidecar's `args` list: names in reports).
//!
//! Sites are the `dot_general` ops with a weight operand, numbered in pre-order over the module
//! (functions in module order) after the weights have been followed — the numbering of
//! `instrument` when it gets the same weight arguments.
//!
//! # What `quantize` emits
//!
//! - the weight arguments (and their loop/call carriers) retyped to `f8E4M3FN` / `f8E5M2`;
//! - each weight `dot_general` →
//!   `"stablehlo.custom_call"(%lhs, %w[, %w_scales]) <{api_version = 4 : i32,
//!   backend_config = {[a_scale = … : f32, ]lhs_batching_dims = array<i64…>,
//!   lhs_contracting_dims = array<i64: …>, rhs_batching_dims = …, rhs_contracting_dims = …,
//!   w_scale = 1.234567890e-2 : f32[, w_scale_dim = k : i64]}, call_target_name =
//!   "fp8xla_matmul"}>`, the activation always lhs (a weight on the lhs is swapped to the rhs and
//!   the result transposed back); per-channel scales are a `tensor<Nxf32>` constant third operand
//!   with `w_scale = 1.0` and `w_scale_dim` the weight dimension they run along;
//! - a transpose of a weight feeding only dots is folded into the matmuls' dimension numbers
//!   (no float copy of the table); an embedding `gather` gathers FP8 rows, then
//!   `convert` + `multiply` dequantize only those rows;
//! - any other use: `convert` + `multiply` by the scale inserted at that use;
//! - each `dynamic_update_slice` in a `while` body whose operand is a value the loop carries →
//!   `"stablehlo.custom_call"(same operands) <{api_version = 4 : i32, backend_config = {},
//!   call_target_name = "fp8xla_update_slice", output_operand_aliases = [operand 0]}>`;
//! - each decode-shaped float32 `dot_general` → `"stablehlo.custom_call"(same operands)
//!   <{api_version = 4 : i32, backend_config = {lhs_batching_dims = …, lhs_contracting_dims =
//!   …, rhs_batching_dims = …, rhs_contracting_dims = …}, call_target_name = "fp8xla_dot_f32"}>`;
//! - each argmax reduce over a large last dim (`jnp.argmax(x, axis=-1)`, the sampler's) →
//!   `"stablehlo.custom_call"(%x) <{api_version = 4 : i32, backend_config = {},
//!   call_target_name = "fp8xla_argmax"}> : (tensor<…xf32>) -> tensor<…xi32>`.
//!
//! # Report (`quantize`)
//!
//! ```json
//! {"pass": "quantize", "entry": "main", "sites": 37,
//!  "weights": [{"arg", "name", "path", "format", "shape", "from", "to", "quantized",
//!               "granularity", "w_scale" | "channel_dim"+"channels", "a_scale"}],
//!  "matmuls": [{"site", "arg", "function", "loc", "weight_operand", "transposed_weight",
//!               "lhs_contracting_dims", "rhs_contracting_dims", "lhs_batching_dims",
//!               "rhs_batching_dims", "output_transpose", "a_scale", "dropped_attributes"}],
//!  "handled": [{"kind": "while" | "call" | "clone" | "transpose" | "transpose_folded" |
//!               "gather" | "dequantize" | "update_slice_in_place" | "f32_dot_gemv" |
//!               "sampler_argmax" | "shard", "arg",
//!               "function", "loc",
//!               "detail" | "reason"}],
//!  (in this order: folded transposes, gathers, the weights' flow through loops, calls and
//!   transposes, dequantized uses, in-place updates, decode dots, sampler argmaxes, sharded calls)
//!  "skipped": [{"arg" | "site", "reason", …}]}
//! ```
//!
//! # `instrument` options and sites table
//!
//! Options: `{"weights": [5, 6], "entry": "main", "args": [...sidecar...]}`; without `weights`,
//! every float entry argument of rank ≥ 2 is a weight. Each site gets
//! `"stablehlo.custom_call"(%x) <{api_version = 4 : i32, backend_config = {site = N : i64},
//! call_target_name = "fp8xla_observe", has_side_effect = true}> : (T) -> T` on its activation,
//! used by that dot in place of `%x`. The table:
//! `{"pass": "instrument", "entry", "weights": [...], "sites": [{"site", "arg", "arg_name",
//! "path", "function", "loc", "weight_operand", "transposed_weight", "activation_shape",
//! "activation_dtype"}]}`.
//!
//! Errors are [`RewriteError`]s naming the stage (`parser`, `options`, `quantize`,
//! `instrument`, `verify`, `pass`), line:column in the module (in the options for `options`),
//! what was expected and what came.

#![forbid(unsafe_code)]

pub mod attr;
pub mod decode_dot;
pub mod emit;
pub mod flow;
mod gather;
pub mod inplace;
pub mod instrument;
pub mod ir;
pub mod kv_cache;
mod options;
pub mod parse;
pub mod pipeline;
pub mod print;
pub mod quantize;
mod registry;
pub mod sampler;
pub mod shard;
pub mod verify;

use std::collections::HashMap;
use std::fmt;

pub use instrument::instrument;
pub use ir::{Module, Pos};
pub use parse::parse_module;
pub use print::print_module;
pub use quantize::quantize;
pub use registry::{run_pass, PASSES};
pub use verify::verify;

/// An error of the parser, a pass or its options: where, what was expected, what came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewriteError {
    /// `parser`, `options`, `quantize`, `instrument`, `verify` (the input, or the module after
    /// the pass named in `expected`) or `pass` (an unknown pass name).
    pub stage: &'static str,
    /// 1-based line in the module text (in the options for `options`; 0 when not about a place).
    pub line: usize,
    /// 1-based column (0 when not about a place).
    pub column: usize,
    /// What was expected.
    pub expected: String,
    /// What came instead.
    pub found: String,
}

impl RewriteError {
    /// An error at `pos`.
    pub fn new(stage: &'static str, pos: Pos, expected: &str, found: &str) -> RewriteError {
        RewriteError {
            stage,
            line: pos.line,
            column: pos.column,
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
}

impl fmt::Display for RewriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}: {}:{}: expected {} but found {}",
                self.stage, self.line, self.column, self.expected, self.found
            )
        } else {
            write!(
                f,
                "{}: expected {} but found {}",
                self.stage, self.expected, self.found
            )
        }
    }
}

impl std::error::Error for RewriteError {}

/// `#name` → definition text (`loc(...)`) of the module's alias definitions.
pub(crate) fn aliases(module: &Module) -> HashMap<String, String> {
    module
        .leading
        .iter()
        .chain(module.trailing.iter())
        .filter_map(|line| {
            let (k, v) = line.split_once('=')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// A location for reports: its name (first string literal, aliases resolved) or its text.
pub(crate) fn loc_json(
    loc: &Option<String>,
    aliases: &HashMap<String, String>,
) -> serde_json::Value {
    match loc {
        None => serde_json::Value::Null,
        Some(l) => {
            serde_json::Value::String(attr::loc_name(l, aliases).unwrap_or_else(|| l.clone()))
        }
    }
}
