//! The `quantize` pass: FP8 weight arguments, `dot_general` → `fp8xla_matmul`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::{json, Value};

use super::attr::{array_i64, fmt_f32, parse_array_i64, GatherDims};
use super::decode_dot;
use super::emit::{with_props, Convert, Emitter, Names, Scale};
use super::flow::{self, Flow, OtherUse, Site};
use super::inplace;
use super::ir::{Dim, ElementType, Module, Op, TensorType, Type};
use super::options::{
    arg_paths, as_index, as_scale, check_keys, entry_name, index_list, kind, opt_err, parse_json,
};
use super::{aliases, loc_json, parse_module, print_module, verify, RewriteError};
use crate::fp8::Format;

/// One weight to quantize.
#[derive(Clone, Debug)]
struct WeightSpec {
    format: Format,
    scale: Scale,
    a_scale: Option<f32>,
}

#[derive(Debug)]
struct Options {
    entry: String,
    weights: BTreeMap<usize, WeightSpec>,
    skip_args: BTreeSet<usize>,
    skip_sites: BTreeSet<usize>,
    a_scales: HashMap<usize, f32>,
    strict: bool,
    update_slices_in_place: bool,
    /// `Some(least streamed bytes)` when decode-shaped float32 dots are rewritten.
    decode_dots: Option<usize>,
    paths: HashMap<usize, String>,
}

fn parse_options(text: &str) -> Result<Options, RewriteError> {
    let m = parse_json(text)?;
    check_keys(
        &m,
        &[
            "entry",
            "weights",
            "skip_args",
            "skip_sites",
            "a_scales",
            "strict",
            "update_slices_in_place",
            "decode_dots",
            "decode_dots_min_bytes",
            "args",
        ],
        "the quantize options",
    )?;
    let mut weights = BTreeMap::new();
    let list = match m.get("weights") {
        Some(Value::Array(l)) => l,
        Some(other) => return Err(opt_err("an array for `weights`", &kind(other))),
        None => return Err(opt_err("a `weights` array", "no such key")),
    };
    for w in list {
        let Value::Object(o) = w else {
            return Err(opt_err("an object in `weights`", &kind(w)));
        };
        check_keys(
            o,
            &["arg", "format", "w_scale", "channel_dim", "a_scale"],
            "a `weights` entry",
        )?;
        let arg = as_index(
            o.get("arg")
                .ok_or_else(|| opt_err("`arg` in each `weights` entry", "none"))?,
            "`weights[].arg`",
        )?;
        let fname = o
            .get("format")
            .and_then(Value::as_str)
            .ok_or_else(|| opt_err("a string `format` (\"e4m3fn\" or \"e5m2\")", "none"))?;
        let format = Format::parse(fname)
            .ok_or_else(|| opt_err("`format` \"e4m3fn\" or \"e5m2\"", &format!("{fname:?}")))?;
        let what = format!("`w_scale` of argument {arg}");
        let scale = match o.get("w_scale") {
            Some(Value::Array(items)) => {
                let scales = items
                    .iter()
                    .map(|s| as_scale(s, &what))
                    .collect::<Result<Vec<_>, _>>()?;
                let dim = match o.get("channel_dim") {
                    Some(d) => as_index(d, "`channel_dim`")?,
                    None => {
                        return Err(opt_err(
                            &format!("`channel_dim` with the per-channel {what}"),
                            "none",
                        ))
                    }
                };
                Scale::PerChannel { dim, scales }
            }
            Some(v) => Scale::PerTensor(as_scale(v, &what)?),
            None => return Err(opt_err(&what, "none")),
        };
        let a_scale = match o.get("a_scale") {
            None | Some(Value::Null) => None,
            Some(v) => Some(as_scale(v, &format!("`a_scale` of argument {arg}"))?),
        };
        let spec = WeightSpec {
            format,
            scale,
            a_scale,
        };
        if weights.insert(arg, spec).is_some() {
            return Err(opt_err(
                "each argument at most once in `weights`",
                &format!("argument {arg} twice"),
            ));
        }
    }
    let mut a_scales = HashMap::new();
    match m.get("a_scales") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                let site: usize = k
                    .parse()
                    .map_err(|_| opt_err("site numbers as keys of `a_scales`", k))?;
                a_scales.insert(site, as_scale(v, &format!("`a_scales[{k}]`"))?);
            }
        }
        Some(other) => return Err(opt_err("an object for `a_scales`", &kind(other))),
    }
    let strict = match m.get("strict") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(opt_err("a boolean for `strict`", &kind(other))),
    };
    let update_slices_in_place = match m.get("update_slices_in_place") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(opt_err(
                "a boolean for `update_slices_in_place`",
                &kind(other),
            ))
        }
    };
    let decode_dots = match m.get("decode_dots") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(opt_err("a boolean for `decode_dots`", &kind(other))),
    };
    let decode_dots_min_bytes = match m.get("decode_dots_min_bytes") {
        None | Some(Value::Null) => decode_dot::MIN_STREAMED_BYTES,
        Some(v) => as_index(v, "`decode_dots_min_bytes`")?,
    };
    Ok(Options {
        entry: entry_name(&m)?,
        weights,
        skip_args: index_list(m.get("skip_args"), "`skip_args`")?
            .into_iter()
            .collect(),
        skip_sites: index_list(m.get("skip_sites"), "`skip_sites`")?
            .into_iter()
            .collect(),
        a_scales,
        strict,
        update_slices_in_place,
        decode_dots: decode_dots.then_some(decode_dots_min_bytes),
        paths: arg_paths(&m)?,
    })
}

fn fp8_element(f: Format) -> ElementType {
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

/// Runs the pass; see the module documentation of [`super`] for the options and the report.
pub fn quantize(module_text: &str, options_json: &str) -> Result<(String, String), RewriteError> {
    let opts = parse_options(options_json)?;
    let mut module = parse_module(module_text)?;
    verify(&module)?;
    let aliases = aliases(&module);
    let stage = "quantize";

    // Original types of the weights, checked against the options.
    let entry = flow::find_func(&module, &opts.entry).ok_or_else(|| {
        RewriteError::new(
            stage,
            module.top.pos,
            &format!("an entry function `@{}`", opts.entry),
            "no such function",
        )
    })?;
    let entry_args: Vec<(String, Type, Option<String>)> = entry
        .regions
        .first()
        .and_then(|r| r.blocks.first())
        .map(|b| {
            b.args
                .iter()
                .map(|a| (a.name.clone(), a.ty.clone(), a.loc.clone()))
                .collect()
        })
        .unwrap_or_default();
    let entry_pos = entry.pos;
    let mut original: HashMap<usize, TensorType> = HashMap::new();
    let mut follow_args: BTreeMap<usize, Option<ElementType>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for (&arg, spec) in &opts.weights {
        let Some((_, ty, _)) = entry_args.get(arg) else {
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
            if let Some((_, ty, _)) = entry_args.get(arg) {
                if ty
                    .as_tensor()
                    .is_some_and(|t| t.element.is_quantizable_float())
                {
                    follow_args.insert(arg, None);
                }
            }
        }
    }
    let quantized = |arg: usize| follow_args.get(&arg).is_some_and(|e| e.is_some());

    let flow = flow::follow(&mut module, &opts.entry, &follow_args, stage)?;
    let sites = flow::sites(&module, &flow)?;
    let mut names = Names::new(&module);

    // Decide each site.
    let mut other_uses: Vec<OtherUse> = flow
        .other_uses
        .iter()
        .filter(|u| quantized(u.arg))
        .cloned()
        .collect();
    let mut site_skip: HashMap<usize, String> = HashMap::new();
    for s in &sites {
        if !quantized(s.arg) {
            site_skip.insert(s.site, format!("argument {} is not quantized", s.arg));
        } else if opts.skip_sites.contains(&s.site) {
            site_skip.insert(s.site, "listed in skip_sites".into());
        } else if let Err(why) = plan_dot(&module, s, &opts.weights[&s.arg], &original[&s.arg]) {
            if opts.strict {
                let op = module.top.find(s.op).expect("site op exists");
                return Err(RewriteError::new(
                    stage,
                    op.pos,
                    "a dot_general on a weight that fp8xla_matmul can take (strict)",
                    &format!("site {} on argument {}: {why}", s.site, s.arg),
                ));
            }
            site_skip.insert(s.site, why);
        }
    }
    // A transpose shared with a skipped site stays, with its input dequantized.
    let mut unfolded: HashSet<u32> = HashSet::new();
    for s in &sites {
        if let (Some(t), Some(_)) = (&s.transposed, site_skip.get(&s.site)) {
            if quantized(s.arg) && unfolded.insert(t.op) {
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
    for s in &sites {
        if let Some(t) = &s.transposed {
            if unfolded.contains(&t.op) && !site_skip.contains_key(&s.site) {
                site_skip.insert(
                    s.site,
                    "shares its transposed weight with a skipped site".to_string(),
                );
            }
        }
    }

    let mut matmuls = Vec::new();
    let mut handled = Vec::new();
    let mut folded: HashSet<u32> = HashSet::new();
    for s in &sites {
        if let Some(why) = site_skip.get(&s.site) {
            let op = module.top.find(s.op).expect("site op exists");
            skipped.push(json!({
                "site": s.site, "arg": s.arg, "function": s.function,
                "loc": loc_json(&op.loc, &aliases), "reason": why,
            }));
            if quantized(s.arg) && s.transposed.is_none() {
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
        let spec = &opts.weights[&s.arg];
        let a_scale = opts.a_scales.get(&s.site).copied().or(spec.a_scale);
        let mut em = Emitter {
            module: &mut module,
            names: &mut names,
        };
        let entry = rewrite_dot(&mut em, s, spec, &original[&s.arg], a_scale, &aliases)?;
        matmuls.push(entry);
        if let Some(lhs_arg) = s.both_weights {
            if quantized(lhs_arg) {
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
            folded.insert(t.op);
        }
    }
    for t in &folded {
        let op = module.top.find(*t).expect("transpose exists");
        handled.push(json!({
            "kind": "transpose_folded", "function": function_of(&flow, *t),
            "loc": loc_json(&op.loc, &aliases),
            "detail": "tied-logits transpose folded into fp8xla_matmul on the untransposed weight",
        }));
        module.remove(*t);
    }

    // Embedding gathers.
    for (id, arg, func) in &flow.gathers {
        if !quantized(*arg) {
            continue;
        }
        let spec = &opts.weights[arg];
        let mut em = Emitter {
            module: &mut module,
            names: &mut names,
        };
        let loc = em.module.top.find(*id).expect("gather exists").loc.clone();
        match rewrite_gather(&mut em, *id, spec, &original[arg]) {
            Ok(detail) => {
                handled.push(json!({
                    "kind": "gather", "arg": arg, "function": func,
                    "loc": loc_json(&loc, &aliases), "detail": detail,
                }));
            }
            Err(why) => other_uses.push(OtherUse {
                op: *id,
                operand: 0,
                arg: *arg,
                function: func.clone(),
                reason: why,
            }),
        }
    }

    for e in &flow.events {
        if quantized(e.arg) {
            handled.push(json!({
                "kind": e.kind, "arg": e.arg, "function": e.function,
                "loc": loc_json(&e.loc, &aliases), "detail": e.detail,
            }));
        }
    }

    // Everything else: dequantize at the use.
    let mut dequantized = Vec::new();
    for u in &other_uses {
        let op = module.top.find(u.op).expect("use exists");
        if opts.strict {
            return Err(RewriteError::new(
                stage,
                op.pos,
                &format!(
                    "only uses of weight argument {} that stay FP8 (dot_general, embedding gather, \
                     while/call pass-through), as `strict` is set",
                    u.arg
                ),
                &format!("`{}` ({})", op.name, u.reason),
            ));
        }
        let spec = &opts.weights[&u.arg];
        let t8 = original[&u.arg].with_element(fp8_element(spec.format));
        let src = op.operands[u.operand].clone();
        let (pos, loc, name) = (op.pos, op.loc.clone(), op.name.clone());
        let out = names.fresh();
        let channel = match &spec.scale {
            Scale::PerChannel { dim, .. } => Some(*dim),
            Scale::PerTensor(_) => None,
        };
        let mut em = Emitter {
            module: &mut module,
            names: &mut names,
        };
        let ops = em.dequantize(
            &src,
            &t8,
            &original[&u.arg].element,
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
        dequantized.push(json!({
            "kind": "dequantize", "arg": u.arg, "function": u.function, "op": name,
            "operand": u.operand, "loc": loc_json(&loc, &aliases), "reason": u.reason,
        }));
    }
    handled.extend(dequantized);
    if opts.update_slices_in_place {
        handled.extend(inplace::update_slices_in_place(&mut module, &aliases));
    }
    if let Some(min_bytes) = opts.decode_dots {
        handled.extend(decode_dot::decode_dots(&mut module, &aliases, min_bytes));
    }

    verify(&module).map_err(|e| RewriteError {
        stage: "quantize",
        expected: format!("a consistently typed result module ({})", e.expected),
        ..e
    })?;

    let weights: Vec<Value> = opts
        .weights
        .iter()
        .map(|(arg, spec)| {
            let t = &original[arg];
            let mut w = json!({
                "arg": arg,
                "name": entry_args.get(*arg).and_then(|a| a.2.clone()).map(|l| loc_json(&Some(l), &aliases)),
                "path": opts.paths.get(arg),
                "format": spec.format.name(),
                "shape": t.static_shape(),
                "from": t.element.to_string(),
                "to": if quantized(*arg) { fp8_element(spec.format).to_string() } else { t.element.to_string() },
                "quantized": quantized(*arg),
                "a_scale": spec.a_scale,
            });
            if let (Value::Object(m), Value::Object(s)) = (&mut w, scale_json(&spec.scale)) {
                m.extend(s);
            }
            w
        })
        .collect();
    let report = json!({
        "pass": "quantize",
        "entry": opts.entry,
        "weights": weights,
        "matmuls": matmuls,
        "handled": handled,
        "skipped": skipped,
        "sites": sites.len(),
    });
    Ok((
        print_module(&module),
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    ))
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
    let d = &s.dims;
    let w_rank = w.rank();
    let activation = 1 - s.weight_operand;
    let act_rank = op
        .operand_types
        .get(activation)
        .and_then(Type::as_tensor)
        .map(TensorType::rank)
        .ok_or("activation operand is not a ranked tensor")?;
    let (act_c, act_b, w_c_op, w_b_op) = if s.weight_operand == 1 {
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
    let perm: Vec<i64> = match &s.transposed {
        Some(t) => t.perm.clone(),
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
    if let Scale::PerChannel { dim, .. } = &spec.scale {
        if !f_w.contains(&(*dim as i64)) {
            return Err(format!(
                "per-channel dim {dim} of the weight is contracted or batched at this dot"
            ));
        }
    }
    let nb = act_b.len();
    let na = act_rank - act_c.len() - act_b.len();
    let mut out_perm: Vec<usize> = (0..nb).collect();
    let act_out: Vec<usize> = (nb..nb + na).collect();
    let w_out: Vec<usize> = f_w
        .iter()
        .map(|x| nb + na + f_sorted.iter().position(|y| y == x).unwrap_or(0))
        .collect();
    if s.weight_operand == 1 {
        out_perm.extend(act_out);
        out_perm.extend(w_out);
    } else {
        out_perm.extend(w_out);
        out_perm.extend(act_out);
    }
    let out_rank = op
        .result_types
        .first()
        .and_then(Type::as_tensor)
        .map(TensorType::rank)
        .ok_or("result is not a ranked tensor")?;
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
}

/// Whether a gather takes whole rows of dim 0 (an embedding lookup: `table[indices]`, the
/// indices being operand 1, of type s32|s64).
fn is_row_take(op: &Op, w: &TensorType) -> bool {
    row_take(op, w).is_some()
}

fn row_take(op: &Op, w: &TensorType) -> Option<()> {
    let g = op.prop("dimension_numbers").and_then(GatherDims::parse)?;
    let sizes = op.prop("slice_sizes").and_then(parse_array_i64)?;
    let idx = op.operand_types.get(1)?.as_tensor()?;
    if !matches!(
        idx.element,
        ElementType::Int {
            width: 32 | 64,
            unsigned: false
        }
    ) {
        return None;
    }
    let idx_rank = idx.rank() as i64;
    let batch_rank = match g.index_vector_dim {
        Some(d) if d == idx_rank => idx_rank,
        Some(d) if d == idx_rank - 1 && matches!(idx.dims.last(), Some(Dim::Static(1))) => d,
        _ => return None,
    };
    let full_rows = w.dims.iter().enumerate().all(|(d, n)| match (d, n) {
        (0, _) => sizes.first() == Some(&1),
        (d, Dim::Static(n)) => sizes.get(d) == Some(&(*n as i64)),
        (_, Dim::Dynamic) => false,
    });
    let trailing: Vec<i64> = (batch_rank..batch_rank + w.rank() as i64 - 1).collect();
    let plain = g.collapsed_slice_dims == [0]
        && g.start_index_map == [0]
        && g.operand_batching_dims.is_empty()
        && g.start_indices_batching_dims.is_empty()
        && g.offset_dims == trailing
        && sizes.len() == w.rank();
    (plain && full_rows).then_some(())
}

/// Replaces a row gather on a per-tensor FP8 table with `fp8xla_take`.
fn take_rows(em: &mut Emitter, op: &Op, out: &TensorType, e8: &ElementType, scale: f32) -> String {
    let take_element = match out.element {
        ElementType::F32 | ElementType::Bf16 => out.element.clone(),
        _ => ElementType::F32,
    };
    let take_ty = out.with_element(take_element.clone());
    let orig_name = op.results[0].name.clone();
    let taken = if take_element == out.element {
        orig_name.clone()
    } else {
        em.names.fresh()
    };
    let mut table_ty = op.operand_types[0].clone();
    if let Type::Tensor(t) = &mut table_ty {
        t.element = e8.clone();
    }
    let call = Op::simple(
        em.id(),
        op.pos,
        Some(&taken),
        "stablehlo.custom_call",
        vec![op.operands[0].clone(), op.operands[1].clone()],
        vec![table_ty, op.operand_types[1].clone()],
        vec![Type::Tensor(take_ty.clone())],
        op.loc.clone(),
    );
    let mut ops = vec![with_props(
        call,
        vec![
            ("api_version", "4 : i32".into()),
            (
                "backend_config",
                format!("{{scale = {} : f32}}", fmt_f32(scale)),
            ),
            ("call_target_name", "\"fp8xla_take\"".into()),
        ],
    )];
    if taken != orig_name {
        ops.push(Op::simple(
            em.id(),
            op.pos,
            Some(&orig_name),
            "stablehlo.convert",
            vec![taken],
            vec![Type::Tensor(take_ty)],
            vec![Type::Tensor(out.clone())],
            op.loc.clone(),
        ));
    }
    em.module.insert_before(op.id, ops);
    em.module.remove(op.id);
    format!("fp8xla_take: dequantizes only the {e8} rows it takes (per-tensor)")
}

/// Gathers FP8 rows, then dequantizes only those rows.
fn rewrite_gather(
    em: &mut Emitter,
    id: u32,
    spec: &WeightSpec,
    w: &TensorType,
) -> Result<String, String> {
    let op = em.module.top.find(id).ok_or("gather vanished")?.clone();
    let out = op
        .result_types
        .first()
        .and_then(Type::as_tensor)
        .filter(|_| op.results.len() == 1 && op.results[0].count == 1)
        .ok_or("gather result is not one ranked tensor")?
        .clone();
    let channel = match &spec.scale {
        Scale::PerTensor(_) => None,
        Scale::PerChannel { dim, .. } => {
            let g = op
                .prop("dimension_numbers")
                .and_then(GatherDims::parse)
                .ok_or("gather without readable dimension numbers")?;
            let sizes = op
                .prop("slice_sizes")
                .and_then(parse_array_i64)
                .ok_or("gather without slice_sizes")?;
            let d = *dim as i64;
            if g.collapsed_slice_dims.contains(&d) || g.operand_batching_dims.contains(&d) {
                return Err(format!("per-channel dim {dim} is collapsed by the gather"));
            }
            if sizes.get(*dim).copied()
                != w.dims.get(*dim).map(|x| match x {
                    Dim::Static(n) => *n as i64,
                    Dim::Dynamic => -1,
                })
            {
                return Err(format!("the gather slices per-channel dim {dim}"));
            }
            let kept: Vec<i64> = (0..w.rank() as i64)
                .filter(|x| {
                    !g.collapsed_slice_dims.contains(x) && !g.operand_batching_dims.contains(x)
                })
                .collect();
            let rank = kept
                .iter()
                .position(|&x| x == d)
                .ok_or("channel dim not kept")?;
            let mut offs = g.offset_dims.clone();
            offs.sort_unstable();
            Some(*offs.get(rank).ok_or("offset_dims too short")? as usize)
        }
    };
    let e8 = fp8_element(spec.format);
    if let (Scale::PerTensor(scale), true) = (&spec.scale, is_row_take(&op, w)) {
        return Ok(take_rows(em, &op, &out, &e8, *scale));
    }
    // XLA's CPU backend has no FP8 gather: it converts the whole table to f16 (and hoists
    // that out of the decode loop). This gather runs on the bytes instead, bitcast to ui8
    // and back; XLA still copies the table for the bitcast, once per call of the module.
    let u8 = ElementType::Int {
        width: 8,
        unsigned: true,
    };
    let table = op
        .operands
        .first()
        .ok_or("gather without operands")?
        .clone();
    let table_ty = op
        .operand_types
        .first()
        .and_then(Type::as_tensor)
        .ok_or("gather operand is not a ranked tensor")?
        .with_element(e8.clone());
    let table_u8 = em.names.fresh();
    let to_bytes = Op::simple(
        em.id(),
        op.pos,
        Some(&table_u8),
        "stablehlo.bitcast_convert",
        vec![table],
        vec![Type::Tensor(table_ty.clone())],
        vec![Type::Tensor(table_ty.with_element(u8.clone()))],
        op.loc.clone(),
    );
    let rows_u8 = em.names.fresh();
    let rows = em.names.fresh();
    let orig_name = op.results[0].name.clone();
    let rows_ty = out.with_element(e8.clone());
    let mut ops = vec![Op::simple(
        em.id(),
        op.pos,
        Some(&rows),
        "stablehlo.bitcast_convert",
        vec![rows_u8.clone()],
        vec![Type::Tensor(rows_ty.with_element(u8.clone()))],
        vec![Type::Tensor(rows_ty.clone())],
        op.loc.clone(),
    )];
    ops.extend(em.dequantize(
        &rows,
        &rows_ty,
        &out.element,
        &spec.scale,
        channel,
        &orig_name,
        op.pos,
        &op.loc,
        Convert::Opaque,
    ));
    let g = em.module.top.find_mut(id).ok_or("gather vanished")?;
    g.results[0].name = rows_u8;
    g.operands[0] = table_u8;
    g.operand_types[0] = Type::Tensor(table_ty.with_element(u8.clone()));
    g.result_types[0] = Type::Tensor(rows_ty.with_element(u8));
    em.module.insert_after(id, ops);
    em.module.insert_before(id, vec![to_bytes]);
    Ok(format!(
        "gathers {e8} rows (as bytes), dequantizes only the gathered rows ({})",
        if channel.is_some() {
            "per-channel"
        } else {
            "per-tensor"
        }
    ))
}
