//! The passes by name: what `fp8xla_rewrite`, the `fp8xla-rewrite` tool and
//! `fp8xla.graph.run_pass` run.

use serde_json::json;

use super::decode_dot::{DecodeDots, MIN_STREAMED_BYTES};
use super::inplace::UpdateSlicesInPlace;
use super::ir::Pos;
use super::kv_cache::Fp8KvCache;
use super::options::{
    self, DecodeDotsJson, KvCacheJson, NoOptions, SamplerArgmaxJson, ShardCallsJson,
};
use super::pipeline::{self, Context, Pass};
use super::sampler::{SamplerArgmax, MIN_SIZE};
use super::shard::ShardCalls;
use super::{instrument, quantize, RewriteError};

/// The names [`run_pass`] knows.
pub const PASSES: &[&str] = &[
    "quantize",
    "instrument",
    "update_slices_in_place",
    "decode_dots",
    "sampler_argmax",
    "shard_calls",
    "fp8_kv_cache",
];

/// Runs pass `name` on the module text with its JSON options; returns the rewritten module and
/// the JSON report. An unknown name is an error (stage `pass`) listing the known ones.
pub fn run_pass(
    name: &str,
    module_text: &str,
    options_json: &str,
) -> Result<(String, String), RewriteError> {
    match name {
        "quantize" => quantize(module_text, options_json),
        "instrument" => instrument(module_text, options_json),
        "update_slices_in_place" => {
            let NoOptions {} = options::parse(options_json, "the update_slices_in_place options")?;
            run_alone(module_text, &UpdateSlicesInPlace)
        }
        "decode_dots" => {
            let o: DecodeDotsJson = options::parse(options_json, "the decode_dots options")?;
            let min_bytes = o.min_bytes.map_or(MIN_STREAMED_BYTES, |b| b.0);
            run_alone(module_text, &DecodeDots { min_bytes })
        }
        "fp8_kv_cache" => {
            let o: KvCacheJson = options::parse(options_json, "the fp8_kv_cache options")?;
            run_alone(module_text, &Fp8KvCache { format: o.format.0 })
        }
        "sampler_argmax" => {
            let o: SamplerArgmaxJson = options::parse(options_json, "the sampler_argmax options")?;
            let min_size = o.min_size.map_or(MIN_SIZE, |n| n.0);
            run_alone(module_text, &SamplerArgmax { min_size })
        }
        "shard_calls" => {
            let o: ShardCallsJson = options::parse(options_json, "the shard_calls options")?;
            let entry = o.entry.unwrap_or_else(|| "main".into());
            run_alone(module_text, &ShardCalls { entry })
        }
        other => Err(RewriteError::new(
            "pass",
            Pos::default(),
            &format!("one of the passes {}", PASSES.join(", ")),
            &format!("the unknown pass {other:?}"),
        )),
    }
}

/// Runs one pass that needs no state; its report is `{"pass": name, "handled": [...]}`.
fn run_alone(module_text: &str, pass: &dyn Pass<()>) -> Result<(String, String), RewriteError> {
    let mut cx = Context::parse(module_text)?;
    pipeline::run(&mut cx, &mut (), &[pass])?;
    let report = json!({"pass": pass.name(), "handled": cx.handled});
    Ok((
        cx.print(),
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    ))
}
