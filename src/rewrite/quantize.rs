//! The `quantize` passes: FP8 weight arguments, `dot_general` → `fp8xla_matmul`.
//!
//! A run follows the weights first (an analysis: it retypes the weight arguments and the loops
//! and calls that carry them, and numbers the sites), then runs the passes
//! - `quantize_dots`: each weight `dot_general` that `fp8xla_matmul` takes becomes one;
//! - `fold_transposes`: a transpose of a weight feeding only rewritten dots is dropped (the
//!   matmuls read the weight in its own layout);
//! - `quantize_gathers`: embedding gathers take FP8 rows ([`super::gather`]);
//! - `dequantize_other_uses`: any other use gets `convert` + `multiply` by the scale;
//! - with the option `kv_cache`, `fp8_kv_cache` ([`super::kv_cache`]);
//! - then, unless turned off, `update_slices_in_place`, `decode_dots`, `sampler_argmax` and
//!   `shard_calls`,
//!
//! verifying the module after each ([`super::pipeline`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::{json, Value};

use super::attr::{array_i64, fmt_f32, DotDims};
use super::decode_dot::{self, DecodeDots};
use super::emit::{with_props, Convert, Emitter, Names, Scale};
use super::flow::{self, Flow, OtherUse, Site};
use super::gather::rewrite_gather;
use super::inplace::UpdateSlicesInPlace;
use super::ir::{Dim, ElementType, Module, Op, TensorType, Type};
use super::kv_cache::Fp8KvCache;
use super::loc_json;
use super::options::{self, arg_paths, opt_err, QuantizeJson, WeightSpec};
use super::pipeline::{self, Context, Pass};
use super::sampler::{self, SamplerArgmax};
use super::shard::ShardCalls;
use super::RewriteError;
use crate::fp8::Format;
use crate::layout;

/// The options of `quantize`, checked (see the [`super`] documentation).
#[derive(Debug)]
pub(crate) struct Options {
    entry: String,
    weights: BTreeMap<usize, WeightSpec>,
    skip_args: BTreeSet<usize>,
    skip_sites: BTreeSet<usize>,
    a_scales: HashMap<usize, f32>,
    strict: bool,
    update_slices_in_place: bool,
    /// `Some(least streamed bytes)` when decode-shaped float32 dots are rewritten.
    decode_dots: Option<usize>,
    /// `Some(least reduced size)` when the sampler's argmax becomes `fp8xla_argmax`.
    sampler_argmax: Option<usize>,
    paths: BTreeMap<usize, String>,
    /// Whether `shard_calls` runs last.
    shard_calls: bool,
    /// The FP8 format of the KV caches (pass `fp8_kv_cache`), if any.
    kv_cache: Option<Format>,
}

impl Options {
    pub(crate) fn parse(text: &str) -> Result<Options, RewriteError> {
        let json: QuantizeJson = options::parse(text, "the quantize options")?;
        let mut weights = BTreeMap::new();
        for w in &json.weights {
            if weights.insert(w.arg.0, w.spec()?).is_some() {
                return Err(opt_err(
                    "each argument at most once in `weights`",
                    &format!("argument {} twice", w.arg.0),
                ));
            }
        }
        let indices = |list: &Option<Vec<options::Index>>| -> BTreeSet<usize> {
            list.iter().flatten().map(|i| i.0).collect()
        };
        Ok(Options {
            entry: json.entry.clone().unwrap_or_else(|| "main".into()),
            weights,
            skip_args: indices(&json.skip_args),
            skip_sites: indices(&json.skip_sites),
            a_scales: json
                .a_scales
                .iter()
                .flatten()
                .map(|(site, scale)| (site.0, scale.0))
                .collect(),
            strict: json.strict.unwrap_or(false),
            update_slices_in_place: json.update_slices_in_place.unwrap_or(true),
            decode_dots: json.decode_dots.unwrap_or(true).then_some(
                json.decode_dots_min_bytes
                    .map_or(decode_dot::MIN_STREAMED_BYTES, |b| b.0),
            ),
            sampler_argmax: json.sampler_argmax.unwrap_or(true).then_some(
                json.sampler_argmax_min_size
                    .map_or(sampler::MIN_SIZE, |n| n.0),
            ),
            paths: arg_paths(&json.args),
            shard_calls: json.shard_calls.unwrap_or(true),
            kv_cache: json.kv_cache.map(|f| f.0),
        })
    }
}

pub(crate) fn fp8_element(f: Format) -> ElementType {
    match f {
        Format::E4m3fn => ElementType::F8E4M3FN,
        Format::E5m2 => ElementType::F8E5M2,
    }
}

fn scale_json(s: &Scale) -> Value {
    match s {
        Scale::PerTensor(x) => json!({"granularity": "per_tensor", "w_scale": x}),
        Scale::PerChannel { dim, scales } => {
            json!({"granularity": "per_channel", "channel_dim": dim, "channels": scales.len()})
        }
    }
}

/// Runs the `quantize` pipeline; see the module documentation of [`super`] for the options and
/// the report.
pub fn quantize(module_text: &str, options_json: &str) -> Result<(String, String), RewriteError> {
    let opts = Options::parse(options_json)?;
    let mut cx = Context::parse(module_text)?;
    let mut weights = Weights::follow(&mut cx, opts)?;
    pipeline::check(&cx, "follow_weights")?;
    let decode_dots = weights
        .opts
        .decode_dots
        .map(|min_bytes| DecodeDots { min_bytes });
    let sampler_argmax = weights
        .opts
        .sampler_argmax
        .map(|min_size| SamplerArgmax { min_size });
    let mut passes: Vec<&dyn Pass<Weights>> = vec![
        &QuantizeDots,
        &FoldTransposes,
        &QuantizeGathers,
        &DequantizeOtherUses,
    ];
    let kv_cache = weights.opts.kv_cache.map(|format| Fp8KvCache { format });
    if let Some(pass) = &kv_cache {
        passes.push(pass);
    }
    if weights.opts.update_slices_in_place {
        passes.push(&UpdateSlicesInPlace);
    }
    if let Some(pass) = &decode_dots {
        passes.push(pass);
    }
    if let Some(pass) = &sampler_argmax {
        passes.push(pass);
    }
    let shard = ShardCalls {
        entry: weights.opts.entry.clone(),
    };
    if weights.opts.shard_calls {
        passes.push(&shard);
    }
    pipeline::run(&mut cx, &mut weights, &passes)?;
    let report = weights.report(&cx);
    Ok((
        cx.print(),
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    ))
}

/// What the `quantize` passes share: the options, the weights as followed, and their part of
/// the report so far.
pub struct Weights {
    opts: Options,
    /// The entry function's arguments: type (as given), location.
    entry_args: Vec<(Type, Option<String>)>,
    /// The original type of each weight.
    original: HashMap<usize, TensorType>,
    /// Every weight followed: its FP8 element type, `None` for those left float.
    follow_args: BTreeMap<usize, Option<ElementType>>,
    flow: Flow,
    sites: Vec<Site>,
    names: Names,
    /// Uses to dequantize (`dequantize_other_uses`); the passes before add the uses they
    /// cannot keep FP8.
    other_uses: Vec<OtherUse>,
    /// Transposes the rewritten dots no longer read (`fold_transposes` removes them).
    folded: BTreeSet<u32>,
    /// Report sections.
    matmuls: Vec<Value>,
    skipped: Vec<Value>,
    transposes_folded: Vec<Value>,
    gathers: Vec<Value>,
    dequantized: Vec<Value>,
}

impl Weights {
    fn quantized(&self, arg: usize) -> bool {
        self.follow_args.get(&arg).is_some_and(|e| e.is_some())
    }

    /// Checks the options against the entry function, then follows the weights through the
    /// module (retyping the quantized ones) and numbers the sites. Leaves every use of a
    /// retyped weight that a pass still has to rewrite in `cx.pending`.
    fn follow(cx: &mut Context, opts: Options) -> Result<Weights, RewriteError> {
        let stage = "quantize";
        let module = &mut cx.module;
        let entry = flow::find_func(module, &opts.entry).ok_or_else(|| {
            RewriteError::new(
                stage,
                module.top.pos,
                &format!("an entry function `@{}`", opts.entry),
                "no such function",
            )
        })?;
        let entry_args = flow::func_args(entry);
        let entry_pos = entry.pos;
        let mut original: HashMap<usize, TensorType> = HashMap::new();
        let mut follow_args: BTreeMap<usize, Option<ElementType>> = BTreeMap::new();
        let mut skipped = Vec::new();
        for (&arg, spec) in &opts.weights {
            let Some((ty, _)) = entry_args.get(arg) else {
                return Err(RewriteError::new(
                    stage,
                    entry_pos,
                    &format!(
                        "a weight argument index below {} (the arguments of @{})",
                        entry_args.len(),
                        opts.entry
                    ),
                    &format!("argument {arg}"),
                ));
            };
            let t = match ty.as_tensor() {
                Some(t) if t.element.is_quantizable_float() => t.clone(),
                _ => {
                    return Err(RewriteError::new(
                        stage,
                        entry_pos,
                        &format!("argument {arg} of @{} to be a float tensor", opts.entry),
                        &format!("`{ty}`"),
                    ))
                }
            };
            if let Scale::PerChannel { dim, scales } = &spec.scale {
                let n = match t.dims.get(*dim) {
                    Some(Dim::Static(n)) => *n as usize,
                    _ => {
                        return Err(opt_err(
                            &format!(
                                "`channel_dim` of argument {arg} to be a static dimension of `{t}`"
                            ),
                            &format!("{dim}"),
                        ))
                    }
                };
                if n != scales.len() {
                    return Err(opt_err(
                        &format!("{n} per-channel scales for argument {arg} (`{t}` dim {dim})"),
                        &format!("{}", scales.len()),
                    ));
                }
            }
            original.insert(arg, t);
            if opts.skip_args.contains(&arg) {
                skipped.push(json!({"arg": arg, "reason": "listed in skip_args"}));
                follow_args.insert(arg, None);
            } else {
                follow_args.insert(arg, Some(fp8_element(spec.format)));
            }
        }
        for &arg in &opts.skip_args {
            if !opts.weights.contains_key(&arg) {
                if let Some((ty, _)) = entry_args.get(arg) {
                    if ty
                        .as_tensor()
                        .is_some_and(|t| t.element.is_quantizable_float())
                    {
                        follow_args.insert(arg, None);
                    }
                }
            }
        }
        let flow = flow::follow(module, &opts.entry, &follow_args, stage)?;
        let sites = flow::sites(module, &flow)?;
        let names = Names::new(module);
        let weights = Weights {
            opts,
            entry_args,
            original,
            follow_args,
            flow,
            sites,
            names,
            other_uses: Vec::new(),
            folded: BTreeSet::new(),
            matmuls: Vec::new(),
            skipped,
            transposes_folded: Vec::new(),
            gathers: Vec::new(),
            dequantized: Vec::new(),
        };
        cx.pending = weights.pending_uses(&cx.module);
        Ok(weights)
    }

    /// The uses of retyped weights that still declare a float operand.
    fn pending_uses(&self, module: &Module) -> HashSet<(u32, usize)> {
        let mut pending = HashSet::new();
        for f in module.functions() {
            let Some(fname) = flow::func_name(f) else {
                continue;
            };
            f.walk_nested(&mut |op| {
                for (k, (value, ty)) in op.operands.iter().zip(&op.operand_types).enumerate() {
                    let weight = self.flow.values.get(&(fname.clone(), value.clone()));
                    if weight.is_some_and(|&arg| self.quantized(arg))
                        && ty.as_tensor().is_some_and(|t| !t.element.is_fp8())
                    {
                        pending.insert((op.id, k));
                    }
                }
            });
        }
        pending
    }

    /// The report of the run (the `handled` list: the quantize passes' entries and the
    /// weights' flow, then those of the passes after them).
    fn report(&self, cx: &Context) -> Value {
        let aliases = &cx.aliases;
        let mut handled = Vec::new();
        handled.extend(self.transposes_folded.iter().cloned());
        handled.extend(self.gathers.iter().cloned());
        for e in &self.flow.events {
            if self.quantized(e.arg) {
                handled.push(json!({
                    "kind": e.kind, "arg": e.arg, "function": e.function,
                    "loc": loc_json(&e.loc, aliases), "detail": e.detail,
                }));
            }
        }
        handled.extend(self.dequantized.iter().cloned());
        handled.extend(cx.handled.iter().cloned());
        let weights: Vec<Value> = self
            .opts
            .weights
            .iter()
            .map(|(arg, spec)| {
                let t = &self.original[arg];
                let quantized = self.quantized(*arg);
                let mut w = json!({
                    "arg": arg,
                    "name": self.entry_args.get(*arg).and_then(|a| a.1.clone()).map(|l| loc_json(&Some(l), aliases)),
                    "path": self.opts.paths.get(arg),
                    "format": spec.format.name(),
                    "shape": t.static_shape(),
                    "from": t.element.to_string(),
                    "to": if quantized { fp8_element(spec.format).to_string() } else { t.element.to_string() },
                    "quantized": quantized,
                    "a_scale": spec.a_scale,
                });
                if let (Value::Object(m), Value::Object(s)) = (&mut w, scale_json(&spec.scale)) {
                    m.extend(s);
                }
                w
            })
            .collect();
        json!({
            "pass": "quantize",
            "entry": self.opts.entry,
            "weights": weights,
            "matmuls": self.matmuls,
            "handled": handled,
            "skipped": self.skipped,
            "sites": self.sites.len(),
        })
    }
}

/// `quantize_dots`: decides each site, and rewrites those `fp8xla_matmul` takes.
struct QuantizeDots;

impl Pass<Weights> for QuantizeDots {
    fn name(&self) -> &'static str {
        "quantize_dots"
    }

    fn run(&self, cx: &mut Context, w: &mut Weights) -> Result<(), RewriteError> {
        let mut site_skip: HashMap<usize, String> = HashMap::new();
        for s in &w.sites {
            if !w.quantized(s.arg) {
                site_skip.insert(s.site, format!("argument {} is not quantized", s.arg));
            } else if w.opts.skip_sites.contains(&s.site) {
                site_skip.insert(s.site, "listed in skip_sites".into());
            } else if let Err(why) =
                plan_dot(&cx.module, s, &w.opts.weights[&s.arg], &w.original[&s.arg])
            {
                if w.opts.strict {
                    let op = cx.module.top.find(s.op).expect("site op exists");
                    return Err(RewriteError::new(
                        "quantize",
                        op.pos,
                        "a dot_general on a weight that fp8xla_matmul can take (strict)",
                        &format!("site {} on argument {}: {why}", s.site, s.arg),
                    ));
                }
                site_skip.insert(s.site, why);
            }
        }
        let mut other_uses: Vec<OtherUse> = w
            .flow
            .other_uses
            .iter()
            .filter(|u| w.quantized(u.arg))
            .cloned()
            .collect();
        // A transpose shared with a skipped site stays, with its input dequantized.
        let mut unfolded: HashSet<u32> = HashSet::new();
        for s in &w.sites {
            if let (Some(t), Some(_)) = (&s.transposed, site_skip.get(&s.site)) {
                if w.quantized(s.arg) && unfolded.insert(t.op) {
                    other_uses.push(OtherUse {
                        op: t.op,
                        operand: 0,
                        arg: s.arg,
                        function: s.function.clone(),
                        reason: format!("transpose feeding skipped site {}", s.site),
                    });
                }
            }
        }
        for s in &w.sites {
            if let Some(t) = &s.transposed {
                if unfolded.contains(&t.op) && !site_skip.contains_key(&s.site) {
                    site_skip.insert(
                        s.site,
                        "shares its transposed weight with a skipped site".to_string(),
                    );
                }
            }
        }

        for s in &w.sites {
            if let Some(why) = site_skip.get(&s.site) {
                let op = cx.module.top.find(s.op).expect("site op exists");
                w.skipped.push(json!({
                    "site": s.site, "arg": s.arg, "function": s.function,
                    "loc": loc_json(&op.loc, &cx.aliases), "reason": why,
                }));
                if w.quantized(s.arg) && s.transposed.is_none() {
                    other_uses.push(OtherUse {
                        op: s.op,
                        operand: s.weight_operand,
                        arg: s.arg,
                        function: s.function.clone(),
                        reason: format!("skipped site {}", s.site),
                    });
                }
                continue;
            }
            let spec = &w.opts.weights[&s.arg];
            // a dynamic weight's activation scales are computed at run time: no static one
            let a_scale = (!spec.a_dynamic)
                .then(|| w.opts.a_scales.get(&s.site).copied().or(spec.a_scale))
                .flatten();
            let mut em = Emitter {
                module: &mut cx.module,
                names: &mut w.names,
            };
            let entry = rewrite_dot(&mut em, s, spec, &w.original[&s.arg], a_scale, &cx.aliases)?;
            w.matmuls.push(entry);
            if s.transposed.is_none() {
                cx.pending.remove(&(s.op, s.weight_operand));
            }
            if let Some(lhs_arg) = s.both_weights {
                if w.quantized(lhs_arg) {
                    other_uses.push(OtherUse {
                        op: s.op,
                        operand: 0,
                        arg: lhs_arg,
                        function: s.function.clone(),
                        reason: "activation operand of an fp8xla_matmul is itself a weight".into(),
                    });
                }
            }
            if let Some(t) = &s.transposed {
                w.folded.insert(t.op);
            }
        }
        w.other_uses = other_uses;
        Ok(())
    }
}

/// `fold_transposes`: removes the transposes of weights that only rewritten dots read.
struct FoldTransposes;

impl Pass<Weights> for FoldTransposes {
    fn name(&self) -> &'static str {
        "fold_transposes"
    }

    fn run(&self, cx: &mut Context, w: &mut Weights) -> Result<(), RewriteError> {
        for &t in &w.folded {
            let op = cx.module.top.find(t).expect("transpose exists");
            w.transposes_folded.push(json!({
                "kind": "transpose_folded", "function": function_of(&w.flow, t),
                "loc": loc_json(&op.loc, &cx.aliases),
                "detail": "tied-logits transpose folded into fp8xla_matmul on the untransposed weight",
            }));
            cx.module.remove(t);
            cx.pending.remove(&(t, 0));
        }
        Ok(())
    }
}

/// `quantize_gathers`: embedding gathers on a weight take its FP8 rows.
struct QuantizeGathers;

impl Pass<Weights> for QuantizeGathers {
    fn name(&self) -> &'static str {
        "quantize_gathers"
    }

    fn run(&self, cx: &mut Context, w: &mut Weights) -> Result<(), RewriteError> {
        for (id, arg, func) in &w.flow.gathers {
            if !w.quantized(*arg) {
                continue;
            }
            let spec = &w.opts.weights[arg];
            let mut em = Emitter {
                module: &mut cx.module,
                names: &mut w.names,
            };
            let loc = em.module.top.find(*id).expect("gather exists").loc.clone();
            match rewrite_gather(&mut em, *id, spec, &w.original[arg]) {
                Ok(detail) => {
                    w.gathers.push(json!({
                        "kind": "gather", "arg": arg, "function": func,
                        "loc": loc_json(&loc, &cx.aliases), "detail": detail,
                    }));
                    cx.pending.remove(&(*id, 0));
                }
                Err(why) => w.other_uses.push(OtherUse {
                    op: *id,
                    operand: 0,
                    arg: *arg,
                    function: func.clone(),
                    reason: why,
                }),
            }
        }
        Ok(())
    }
}

/// `dequantize_other_uses`: every use of a weight not yet rewritten gets `convert` +
/// `multiply` by the scale (an error under `strict`).
struct DequantizeOtherUses;

impl Pass<Weights> for DequantizeOtherUses {
    fn name(&self) -> &'static str {
        "dequantize_other_uses"
    }

    fn run(&self, cx: &mut Context, w: &mut Weights) -> Result<(), RewriteError> {
        let module = &mut cx.module;
        for u in &w.other_uses {
            let op = module.top.find(u.op).expect("use exists");
            if w.opts.strict {
                return Err(RewriteError::new(
                    "quantize",
                    op.pos,
                    &format!(
                        "only uses of weight argument {} that stay FP8 (dot_general, embedding \
                         gather, while/call pass-through), as `strict` is set",
                        u.arg
                    ),
                    &format!("`{}` ({})", op.name, u.reason),
                ));
            }
            let spec = &w.opts.weights[&u.arg];
            let t8 = w.original[&u.arg].with_element(fp8_element(spec.format));
            let src = op.operands[u.operand].clone();
            let (pos, loc, name) = (op.pos, op.loc.clone(), op.name.clone());
            let out = w.names.fresh();
            let channel = match &spec.scale {
                Scale::PerChannel { dim, .. } => Some(*dim),
                Scale::PerTensor(_) => None,
            };
            let mut em = Emitter {
                module,
                names: &mut w.names,
            };
            let ops = em.dequantize(
                &src,
                &t8,
                &w.original[&u.arg].element,
                &spec.scale,
                channel,
                &out,
                pos,
                &loc,
                Convert::Plain,
            );
            module.insert_before(u.op, ops);
            if let Some(op) = module.top.find_mut(u.op) {
                op.operands[u.operand] = out;
            }
            cx.pending.remove(&(u.op, u.operand));
            w.dequantized.push(json!({
                "kind": "dequantize", "arg": u.arg, "function": u.function, "op": name,
                "operand": u.operand, "loc": loc_json(&loc, &cx.aliases), "reason": u.reason,
            }));
        }
        // Every use of a weight is rewritten now: from here on, verify is strict.
        cx.pending.clear();
        Ok(())
    }
}

fn function_of(flow: &Flow, transpose: u32) -> Option<String> {
    flow.transposed
        .iter()
        .find(|(_, t)| t.op == transpose)
        .map(|(k, _)| k.0.clone())
}

/// The dot rewritten to the matmul's operand order and dims.
struct Plan {
    activation: usize,
    lhs_contracting: Vec<i64>,
    lhs_batching: Vec<i64>,
    rhs_contracting: Vec<i64>,
    rhs_batching: Vec<i64>,
    /// Original output dim d sits at matmul output dim `out_perm[d]`.
    out_perm: Vec<usize>,
}

fn plan_dot(module: &Module, s: &Site, spec: &WeightSpec, w: &TensorType) -> Result<Plan, String> {
    let op = module.top.find(s.op).ok_or("dot vanished")?;
    let rank = |t: Option<&Type>| t.and_then(Type::as_tensor).map(TensorType::rank);
    let act_rank = rank(op.operand_types.get(1 - s.weight_operand))
        .ok_or("activation operand is not a ranked tensor")?;
    let out_rank = rank(op.result_types.first()).ok_or("result is not a ranked tensor")?;
    let channel_dim = match &spec.scale {
        Scale::PerChannel { dim, .. } => Some(*dim),
        Scale::PerTensor(_) => None,
    };
    plan_matmul(
        &s.dims,
        s.weight_operand,
        act_rank,
        w.rank(),
        s.transposed.as_ref().map(|t| t.perm.as_slice()),
        channel_dim,
        out_rank,
    )
}

/// Plans the `fp8xla_matmul` for a `dot_general` of ranks `act_rank` (the activation) and
/// `w_rank` (the weight, operand `weight_operand`, seen through the transpose `perm` if any),
/// with a result of rank `out_rank`; the reason when the call cannot take it, its layout rules
/// ([`layout::matmul_axes`]) included.
fn plan_matmul(
    d: &DotDims,
    weight_operand: usize,
    act_rank: usize,
    w_rank: usize,
    perm: Option<&[i64]>,
    channel_dim: Option<usize>,
    out_rank: usize,
) -> Result<Plan, String> {
    let activation = 1 - weight_operand;
    let (act_c, act_b, w_c_op, w_b_op) = if weight_operand == 1 {
        (
            &d.lhs_contracting,
            &d.lhs_batching,
            &d.rhs_contracting,
            &d.rhs_batching,
        )
    } else {
        (
            &d.rhs_contracting,
            &d.rhs_batching,
            &d.lhs_contracting,
            &d.lhs_batching,
        )
    };
    let perm: Vec<i64> = match perm {
        Some(p) => p.to_vec(),
        None => (0..w_rank as i64).collect(),
    };
    let mut sorted = perm.clone();
    sorted.sort_unstable();
    if sorted != (0..w_rank as i64).collect::<Vec<_>>() {
        return Err(format!(
            "transpose permutation {perm:?} does not fit rank {w_rank}"
        ));
    }
    let in_range = |dims: &[i64], rank: usize| dims.iter().all(|&x| x >= 0 && (x as usize) < rank);
    if !in_range(act_c, act_rank)
        || !in_range(act_b, act_rank)
        || !in_range(w_c_op, w_rank)
        || !in_range(w_b_op, w_rank)
    {
        return Err("dimension numbers out of range".into());
    }
    let map = |dims: &[i64]| dims.iter().map(|&x| perm[x as usize]).collect::<Vec<i64>>();
    let w_c = map(w_c_op);
    let w_b = map(w_b_op);
    let w_free_op: Vec<i64> = (0..w_rank as i64)
        .filter(|x| !w_c_op.contains(x) && !w_b_op.contains(x))
        .collect();
    let f_w: Vec<i64> = map(&w_free_op);
    let mut f_sorted = f_w.clone();
    f_sorted.sort_unstable();
    if let Some(dim) = channel_dim {
        if !f_w.contains(&(dim as i64)) {
            return Err(format!(
                "per-channel dim {dim} of the weight is contracted or batched at this dot"
            ));
        }
    }
    // What the handler will check on every call, checked here once.
    layout::matmul_axes(act_rank, w_rank, act_c, &w_c, act_b, &w_b)
        .map_err(|e| format!("fp8xla_matmul refuses this layout: {e}"))?;
    let nb = act_b.len();
    let na = act_rank - act_c.len() - act_b.len();
    let mut out_perm: Vec<usize> = (0..nb).collect();
    let act_out: Vec<usize> = (nb..nb + na).collect();
    let w_out: Vec<usize> = f_w
        .iter()
        .map(|x| nb + na + f_sorted.iter().position(|y| y == x).unwrap_or(0))
        .collect();
    if weight_operand == 1 {
        out_perm.extend(act_out);
        out_perm.extend(w_out);
    } else {
        out_perm.extend(w_out);
        out_perm.extend(act_out);
    }
    if out_rank != out_perm.len() {
        return Err(format!(
            "result rank {out_rank} does not match the dimension numbers ({})",
            out_perm.len()
        ));
    }
    Ok(Plan {
        activation,
        lhs_contracting: act_c.clone(),
        lhs_batching: act_b.clone(),
        rhs_contracting: w_c,
        rhs_batching: w_b,
        out_perm,
    })
}

fn rewrite_dot(
    em: &mut Emitter,
    s: &Site,
    spec: &WeightSpec,
    w: &TensorType,
    a_scale: Option<f32>,
    aliases: &HashMap<String, String>,
) -> Result<Value, RewriteError> {
    let plan = plan_dot(em.module, s, spec, w).map_err(|why| {
        RewriteError::new("quantize", Default::default(), "a plannable dot", &why)
    })?;
    let op = em.module.top.find(s.op).expect("site op exists").clone();
    let w_value = match &s.transposed {
        Some(t) => t.source.clone(),
        None => op.operands[s.weight_operand].clone(),
    };
    let w8 = w.with_element(fp8_element(spec.format));
    let mut operands = vec![op.operands[plan.activation].clone(), w_value];
    let mut operand_types = vec![op.operand_types[plan.activation].clone(), Type::Tensor(w8)];
    let mut config = vec![
        ("lhs_batching_dims", array_i64(&plan.lhs_batching)),
        ("lhs_contracting_dims", array_i64(&plan.lhs_contracting)),
        ("rhs_batching_dims", array_i64(&plan.rhs_batching)),
        ("rhs_contracting_dims", array_i64(&plan.rhs_contracting)),
    ];
    if let Some(a) = a_scale {
        config.insert(0, ("a_scale", format!("{} : f32", fmt_f32(a))));
    }
    if spec.a_dynamic {
        config.insert(0, ("a_dynamic", "true".into()));
    }
    let mut before = Vec::new();
    match &spec.scale {
        Scale::PerTensor(x) => config.push(("w_scale", format!("{} : f32", fmt_f32(*x)))),
        Scale::PerChannel { dim, scales } => {
            config.push(("w_scale", format!("{} : f32", fmt_f32(1.0))));
            config.push(("w_scale_dim", format!("{dim} : i64")));
            let c = em.names.fresh();
            let (cop, cty) = em.constant(&c, scales, false, op.pos, &op.loc);
            before.push(cop);
            operands.push(c);
            operand_types.push(Type::Tensor(cty));
        }
    }
    let orig_out = op.result_types[0].as_tensor().expect("planned").clone();
    let identity = plan.out_perm.iter().enumerate().all(|(i, &p)| i == p);
    let mut mm_dims = orig_out.dims.clone();
    for (d, &p) in plan.out_perm.iter().enumerate() {
        mm_dims[p] = orig_out.dims[d];
    }
    let mm_ty = TensorType {
        dims: mm_dims,
        element: orig_out.element.clone(),
        encoding: orig_out.encoding.clone(),
    };
    let backend = config
        .iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let orig_name = op
        .results
        .first()
        .map(|g| g.name.clone())
        .unwrap_or_default();
    let mm_name = if identity {
        orig_name.clone()
    } else {
        em.names.fresh()
    };
    let mut after = Vec::new();
    if !identity {
        let t = Op::simple(
            em.id(),
            op.pos,
            Some(&orig_name),
            "stablehlo.transpose",
            vec![mm_name.clone()],
            vec![Type::Tensor(mm_ty.clone())],
            vec![Type::Tensor(orig_out.clone())],
            op.loc.clone(),
        );
        let perm: Vec<i64> = plan.out_perm.iter().map(|&p| p as i64).collect();
        after.push(with_props(t, vec![("permutation", array_i64(&perm))]));
    }
    let dropped: Vec<String> = op
        .properties
        .iter()
        .flat_map(|p| p.entries.iter())
        .filter(|a| a.name != "dot_dimension_numbers")
        .map(|a| a.name.clone())
        .collect();
    let new = em.module.top.find_mut(s.op).expect("site op exists");
    new.name = "stablehlo.custom_call".into();
    new.operands = operands;
    new.operand_types = operand_types;
    new.result_types = vec![Type::Tensor(mm_ty)];
    new.parenthesized_result = false;
    if let Some(g) = new.results.first_mut() {
        g.name = mm_name;
    }
    *new = with_props(
        new.clone(),
        vec![
            ("api_version", "4 : i32".into()),
            ("backend_config", format!("{{{backend}}}")),
            ("call_target_name", "\"fp8xla_matmul\"".into()),
        ],
    );
    em.module.insert_before(s.op, before);
    em.module.insert_after(s.op, after);
    Ok(json!({
        "site": s.site,
        "arg": s.arg,
        "function": s.function,
        "loc": loc_json(&op.loc, aliases),
        "weight_operand": if s.weight_operand == 1 { "rhs" } else { "lhs" },
        "transposed_weight": s.transposed.as_ref().map(|t| t.perm.clone()),
        "lhs_contracting_dims": plan.lhs_contracting,
        "rhs_contracting_dims": plan.rhs_contracting,
        "lhs_batching_dims": plan.lhs_batching,
        "rhs_batching_dims": plan.rhs_batching,
        "output_transpose": if identity { None } else { Some(plan.out_perm.clone()) },
        "a_scale": a_scale,
        "dropped_attributes": dropped,
    }))
    .map(|mut entry| {
        if spec.a_dynamic {
            entry["a_dynamic"] = Value::Bool(true); // run-time per-row activation scales
        }
        entry
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A `dot_general` of an activation with a weight (operand `weight_operand`, seen through
    /// the transpose `perm`): dimension numbers and shapes.
    #[derive(Debug, Clone)]
    struct Dot {
        dims: DotDims,
        weight_operand: usize,
        act_shape: Vec<i64>,
        /// The weight as stored (before the transpose).
        w_shape: Vec<i64>,
        perm: Option<Vec<i64>>,
    }

    /// Activation and weight of rank 1 to 4; a few dims paired as batching, a few as
    /// contracting, in any order on either side; sizes 1 to 3 (equal within a pair).
    fn dots() -> impl Strategy<Value = Dot> {
        (1usize..=4, 1usize..=4)
            .prop_flat_map(|(act_rank, w_rank)| {
                let paired = act_rank.min(w_rank);
                (
                    Just((0..act_rank as i64).collect::<Vec<_>>()).prop_shuffle(),
                    Just((0..w_rank as i64).collect::<Vec<_>>()).prop_shuffle(),
                    0..=paired,
                    0..=paired,
                    proptest::collection::vec(1i64..=3, w_rank),
                    proptest::collection::vec(1i64..=3, act_rank),
                    proptest::option::of(
                        Just((0..w_rank as i64).collect::<Vec<_>>()).prop_shuffle(),
                    ),
                    0usize..=1,
                )
            })
            .prop_map(
                |(act_order, w_order, nb, nc, w_shape, mut act_shape, perm, weight_operand)| {
                    let paired = act_order.len().min(w_order.len());
                    let nb = nb.min(paired);
                    let nc = nc.min(paired - nb);
                    let (act_b, act_c) =
                        (act_order[..nb].to_vec(), act_order[nb..nb + nc].to_vec());
                    let (w_b, w_c) = (w_order[..nb].to_vec(), w_order[nb..nb + nc].to_vec());
                    // The weight operand's dim i is stored dim perm[i].
                    let stored = |i: i64| perm.as_ref().map_or(i, |p| p[i as usize]);
                    for (&a, &w) in act_b.iter().chain(&act_c).zip(w_b.iter().chain(&w_c)) {
                        act_shape[a as usize] = w_shape[stored(w) as usize];
                    }
                    let dims = if weight_operand == 1 {
                        DotDims {
                            lhs_batching: act_b,
                            rhs_batching: w_b,
                            lhs_contracting: act_c,
                            rhs_contracting: w_c,
                        }
                    } else {
                        DotDims {
                            lhs_batching: w_b,
                            rhs_batching: act_b,
                            lhs_contracting: w_c,
                            rhs_contracting: act_c,
                        }
                    };
                    Dot {
                        dims,
                        weight_operand,
                        act_shape,
                        w_shape,
                        perm,
                    }
                },
            )
    }

    /// The dot's result shape, as `stablehlo.dot_general` defines it: batch dims, lhs free
    /// dims, rhs free dims.
    fn result_shape(d: &Dot) -> Vec<i64> {
        let w_operand_shape: Vec<i64> = match &d.perm {
            Some(p) => p.iter().map(|&i| d.w_shape[i as usize]).collect(),
            None => d.w_shape.clone(),
        };
        let (lhs, rhs) = if d.weight_operand == 1 {
            (&d.act_shape, &w_operand_shape)
        } else {
            (&w_operand_shape, &d.act_shape)
        };
        let free = |shape: &[i64], c: &[i64], b: &[i64]| -> Vec<i64> {
            (0..shape.len() as i64)
                .filter(|x| !c.contains(x) && !b.contains(x))
                .map(|x| shape[x as usize])
                .collect()
        };
        let t = &d.dims;
        let mut out: Vec<i64> = t.lhs_batching.iter().map(|&x| lhs[x as usize]).collect();
        out.extend(free(lhs, &t.lhs_contracting, &t.lhs_batching));
        out.extend(free(rhs, &t.rhs_contracting, &t.rhs_batching));
        out
    }

    /// The call's dimension numbers on the stored weight: the activation's, and the weight
    /// operand's mapped through the transpose.
    fn call_dims(d: &Dot) -> [Vec<i64>; 4] {
        let t = &d.dims;
        let (act_c, act_b, w_c, w_b) = if d.weight_operand == 1 {
            (
                &t.lhs_contracting,
                &t.lhs_batching,
                &t.rhs_contracting,
                &t.rhs_batching,
            )
        } else {
            (
                &t.rhs_contracting,
                &t.rhs_batching,
                &t.lhs_contracting,
                &t.lhs_batching,
            )
        };
        let stored = |v: &Vec<i64>| -> Vec<i64> {
            v.iter()
                .map(|&i| d.perm.as_ref().map_or(i, |p| p[i as usize]))
                .collect()
        };
        [act_c.clone(), stored(w_c), act_b.clone(), stored(w_b)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Every layout the planner emits, `fp8xla_matmul` accepts (with the result the dot
        /// had, once transposed back), and every one it accepts, the planner emits.
        #[test]
        fn planner_and_matmul_handler_agree(d in dots()) {
            let out = result_shape(&d);
            let planned = plan_matmul(
                &d.dims,
                d.weight_operand,
                d.act_shape.len(),
                d.w_shape.len(),
                d.perm.as_deref(),
                None,
                out.len(),
            );
            let [c_act, c_w, b_act, b_w] = call_dims(&d);
            let handler = layout::matmul_layout(&d.act_shape, &d.w_shape, &c_act, &c_w, &b_act, &b_w);
            match (&planned, &handler) {
                (Ok(p), Ok(h)) => {
                    prop_assert_eq!(
                        [&p.lhs_contracting, &p.rhs_contracting, &p.lhs_batching, &p.rhs_batching],
                        [&c_act, &c_w, &b_act, &b_w]
                    );
                    for (dim, &size) in out.iter().enumerate() {
                        prop_assert_eq!(h.out_dims[p.out_perm[dim]], size);
                    }
                }
                (Err(_), Err(_)) => {}
                (p, h) => prop_assert!(false, "planner {:?} but handler {:?}", p.as_ref().err(), h.as_ref().err()),
            }
        }
    }
}
