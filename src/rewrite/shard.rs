//! The pass `shard_calls`: fp8xla custom calls on sharded operands become manual computations
//! over the mesh, so that each device runs the call on its own shard.
//!
//! Why: XLA's SPMD partitioner knows nothing of a custom call, so it all-gathers every operand
//! and runs the whole call on every device: a sharded FP8 model would be replicated. Shardy's
//! `sdy.manual_computation` (what `shard_map` lowers to) tells it what each device computes;
//! it survives `jax.export` serialization, and it also works nested in `stablehlo.while`.
//!
//! What it reads: the module's `sdy.mesh` ops and the per-argument `sdy.sharding` of the entry
//! function (what `jax.export` writes for arguments given as
//! `ShapeDtypeStruct(..., sharding=NamedSharding(...))`), and the results of
//! `sdy.sharding_constraint` ops (`jax.lax.with_sharding_constraint`, e.g. on a KV cache).
//! A sharded value is followed through `stablehlo.while` loops that carry it unchanged, into
//! functions through `func.call`, and through `fp8xla_update_slice` (its result is its
//! operand 0).
//!
//! What it rewrites (an operand whose sharding is unknown is taken as the others require):
//! - `fp8xla_matmul` and `fp8xla_dot_f32` with a sharded operand: a dimension split on a free
//!   (output) dimension of that operand (column parallel) needs no collective, the result is
//!   split the same way; a split contracting dimension (row parallel) splits the other
//!   operand's matching dimension too and sums the partial products with one
//!   `stablehlo.all_reduce`; a split batching dimension (e.g. a head-sharded KV cache) splits
//!   the other operand and the result. Per-channel scales follow the weight dimension they run
//!   along.
//! - `fp8xla_update_slice` on a sharded operand: the update is split the same way; a split
//!   dimension must be whole in the update (each device writes its own heads).
//! - `fp8xla_take` on a table split on its row dimension (vocab parallel): each device takes
//!   the rows it holds, zeros the others, and one all-reduce sums them; split on the embedding
//!   dimension: the result is split the same way, no collective.
//! - the elementwise targets ([`ELEMENTWISE`]) of rank ≥ 2 get `mhlo.frontend_attributes =
//!   {num_batch_dims = "rank-1"}` and an `sdy.sharding_rule` that maps each dimension to
//!   itself: with the target registered as batch partitionable (`fp8xla` does this when it
//!   loads the library), XLA runs them on the shard each device holds along the leading
//!   dimensions (the last one stays whole), whatever sharding propagation gave the operand.
//! - `fp8xla_observe` (calibration; it has a side effect, which XLA's partitioner refuses to
//!   replicate) runs in a manual computation over every mesh axis on the whole activation:
//!   each device records the same maximum into its process's table.
//! - anything else with a sharded operand is left to XLA (it gathers the operand).
//!
//! Replicated operands change nothing. A dimension the mesh axes do not divide, a mesh with its
//! own device order, sub-axes, or a callee reached with two different shardings are errors
//! naming the value (the entry argument and its name) and the dimension.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::{json, Value};

use super::attr::split_top;
use super::emit::{set_props, Names};
use super::flow::{find_func, func_name};
use super::ir::{Attr, AttrDict, Block, BlockArg, Dim, ElementType, Module, Op, Pos, Region};
use super::ir::{TensorType, Type};
use super::loc_json;
use super::pipeline::{Context, Pass};
use super::RewriteError;

const STAGE: &str = "shard_calls";

/// Targets that work element by element: batch partitionable on all but the last dimension.
pub const ELEMENTWISE: &[&str] = &["fp8xla_quantize", "fp8xla_dequantize", "fp8xla_qdq"];

/// The calibration observer: a side effect, which XLA cannot replicate.
const OBSERVE: &str = "fp8xla_observe";

/// Marks elementwise calls batch partitionable (see the module documentation).
fn mark_elementwise(module: &mut Module, aliases: &HashMap<String, String>) -> Vec<Value> {
    let mut report = Vec::new();
    module.top.walk_mut(&mut |op| {
        if op.name != "stablehlo.custom_call" {
            return;
        }
        let Some(name) = target(op) else { return };
        if !ELEMENTWISE.contains(&name.as_str()) {
            return;
        }
        let dims = match op.result_types.first().and_then(|t| t.as_tensor()) {
            Some(t) if t.rank() >= 2 => t.static_shape(),
            _ => None,
        };
        let Some(dims) = dims else { return };
        let attrs = op.attributes.get_or_insert_with(AttrDict::default);
        if attrs.get("mhlo.frontend_attributes").is_some()
            || attrs.get("sdy.sharding_rule").is_some()
        {
            return;
        }
        let letters: Vec<String> = (0..dims.len())
            .map(|i| {
                let c = (b'i' + (i % 18) as u8) as char;
                if i < 18 {
                    c.to_string()
                } else {
                    format!("{c}{}", i / 18)
                }
            })
            .collect();
        let factors = letters.join(", ");
        let sizes: Vec<String> = letters
            .iter()
            .zip(&dims)
            .map(|(l, n)| format!("{l}={n}"))
            .collect();
        let operands = vec![format!("[{factors}]"); op.operands.len()].join(", ");
        let results = vec![format!("[{factors}]"); op.result_types.len()].join(", ");
        attrs.set(
            "mhlo.frontend_attributes",
            format!("{{num_batch_dims = \"{}\"}}", dims.len() - 1),
        );
        attrs.set(
            "sdy.sharding_rule",
            format!(
                "#sdy.op_sharding_rule<({operands})->({results}) {{{}}}>",
                sizes.join(", ")
            ),
        );
        report.push(json!({
            "kind": "shard", "function": Value::Null, "loc": loc_json(&op.loc, aliases),
            "detail": format!("{name}: batch partitionable over its first {} dims", dims.len() - 1),
        }));
    });
    report
}

/// The pass `shard_calls` on the entry function `entry`.
pub struct ShardCalls {
    /// The entry function (`main`).
    pub entry: String,
}

impl<S> Pass<S> for ShardCalls {
    fn name(&self) -> &'static str {
        "shard_calls"
    }

    fn run(&self, cx: &mut Context, _: &mut S) -> Result<(), RewriteError> {
        let report = shard_calls(&mut cx.module, &self.entry, &cx.aliases)?;
        cx.handled.extend(report);
        Ok(())
    }
}

/// A device mesh: its axes, in order.
#[derive(Clone, Debug, PartialEq)]
struct Mesh {
    axes: Vec<(String, u64)>,
    /// Written with its own device order (`device_ids=[…]`): refused when a split uses it.
    device_ids: bool,
}

impl Mesh {
    fn size(&self, axis: &str) -> u64 {
        self.axes.iter().find(|(a, _)| a == axis).map_or(1, |a| a.1)
    }

    fn devices(&self) -> u64 {
        self.axes.iter().map(|a| a.1).product()
    }
}

/// The axes each dimension of a value is split over (empty: whole on every device).
#[derive(Clone, Debug, PartialEq)]
struct Sharding {
    mesh: String,
    dims: Vec<Vec<String>>,
}

impl Sharding {
    fn is_split(&self) -> bool {
        self.dims.iter().any(|d| !d.is_empty())
    }
}

/// A sharded value: its sharding and what it is, for errors and the report.
#[derive(Clone, Debug)]
struct Known {
    sharding: Sharding,
    origin: String,
}

fn err(pos: Pos, expected: &str, found: &str) -> RewriteError {
    RewriteError::new(STAGE, pos, expected, found)
}

fn unquote(s: &str) -> Option<&str> {
    s.trim().strip_prefix('"')?.strip_suffix('"')
}

/// `#sdy.mesh<["data"=1, "model"=2]>`.
fn parse_mesh(text: &str, pos: Pos) -> Result<Mesh, RewriteError> {
    let bad = |why: &str| {
        err(
            pos,
            &format!("a mesh `#sdy.mesh<[\"axis\"=size, …]>` in the default device order ({why})"),
            &format!("`{text}`"),
        )
    };
    let inner = text
        .trim()
        .strip_prefix("#sdy.mesh<")
        .and_then(|t| t.strip_suffix('>'))
        .ok_or_else(|| bad("not a mesh"))?;
    let parts = split_top(inner);
    let device_ids = parts.len() > 1;
    let list = parts[0]
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or_else(|| bad("no axis list"))?;
    let mut axes = Vec::new();
    for a in split_top(list) {
        let (name, size) = a
            .split_once('=')
            .ok_or_else(|| bad("an axis without size"))?;
        let name = unquote(name).ok_or_else(|| bad("an axis name is not a string"))?;
        let size: u64 = size
            .trim()
            .parse()
            .map_err(|_| bad("an axis size is not a number"))?;
        axes.push((name.to_string(), size));
    }
    Ok(Mesh { axes, device_ids })
}

/// `#sdy.sharding<@mesh, [{}, {"model"}]>` (open dimensions `?` and priorities are accepted and
/// read as the axes they name; `replicated=` and `unreduced=` lists change nothing here).
fn parse_sharding(text: &str, pos: Pos, what: &str) -> Result<Sharding, RewriteError> {
    let inner = text
        .trim()
        .strip_prefix("#sdy.sharding")
        .unwrap_or(text.trim())
        .trim();
    let inner = inner
        .strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(inner);
    dim_shardings(inner, pos, what)
}

/// `@mesh, [{}, {"model"}]`, as in a sharding or an entry of `#sdy.sharding_per_value`.
fn dim_shardings(inner: &str, pos: Pos, what: &str) -> Result<Sharding, RewriteError> {
    let bad = |why: &str| {
        err(
            pos,
            &format!(
                "a sharding of {what} the pass can express, `@mesh, [{{\"axis\", …}}, …]` ({why})"
            ),
            &format!("`{inner}`"),
        )
    };
    let parts = split_top(inner);
    let mesh = parts
        .first()
        .and_then(|m| m.strip_prefix('@'))
        .ok_or_else(|| bad("an inline mesh instead of a mesh symbol"))?
        .to_string();
    let list = parts
        .get(1)
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.strip_suffix(']'))
        .ok_or_else(|| bad("no dimension list"))?;
    let mut dims = Vec::new();
    for d in split_top(list) {
        // `{"model", ?}p1`: drop the priority.
        let d = d.trim_end_matches(|c: char| c.is_ascii_digit());
        let d = d.strip_suffix('p').unwrap_or(d);
        let axes = d
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .ok_or_else(|| bad("a dimension is not `{…}`"))?;
        let mut names = Vec::new();
        for a in split_top(axes) {
            if a == "?" {
                continue;
            }
            let name = unquote(a).ok_or_else(|| bad("sub-axes are not supported"))?;
            names.push(name.to_string());
        }
        dims.push(names);
    }
    Ok(Sharding { mesh, dims })
}

/// The module's meshes by symbol name.
fn meshes(module: &Module) -> Result<HashMap<String, Mesh>, RewriteError> {
    let mut out = HashMap::new();
    for r in &module.top.regions {
        for b in &r.blocks {
            for op in b.ops.iter().filter(|o| o.name == "sdy.mesh") {
                let name = op
                    .prop("sym_name")
                    .and_then(unquote)
                    .ok_or_else(|| err(op.pos, "a mesh with a `sym_name`", "none"))?;
                let text = op
                    .prop("mesh")
                    .ok_or_else(|| err(op.pos, "a mesh with a `mesh` attribute", "none"))?;
                out.insert(name.to_string(), parse_mesh(text, op.pos)?);
            }
        }
    }
    Ok(out)
}

/// The `sdy.sharding` of each argument of the function `func` (`None` where there is none).
fn arg_shardings(func: &Op) -> Result<Vec<Option<Sharding>>, RewriteError> {
    let Some(list) = func.prop("arg_attrs") else {
        return Ok(Vec::new());
    };
    let inner = list
        .trim()
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or("");
    let mut out = Vec::new();
    for (i, dict) in split_top(inner).into_iter().enumerate() {
        let entries = dict
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or("");
        let mut found = None;
        for e in split_top(entries) {
            if let Some((k, v)) = e.split_once('=') {
                if k.trim() == "sdy.sharding" {
                    found = Some(parse_sharding(v, func.pos, &format!("argument {i}"))?);
                }
            }
        }
        out.push(found);
    }
    Ok(out)
}

/// What a value is, for messages: `argument 5 ("decoder/query/kernel")`.
fn describe_arg(i: usize, func: &Op, aliases: &HashMap<String, String>) -> String {
    let loc = func
        .regions
        .first()
        .and_then(|r| r.blocks.first())
        .and_then(|b| b.args.get(i))
        .and_then(|a| a.loc.clone());
    match loc_json(&loc, aliases) {
        Value::String(name) => format!("argument {i} ({name})"),
        _ => format!("argument {i}"),
    }
}

/// Follows the sharded values from the entry arguments and sharding constraints.
fn follow(
    module: &Module,
    entry: &str,
    aliases: &HashMap<String, String>,
) -> Result<HashMap<(String, String), Known>, RewriteError> {
    let mut known: HashMap<(String, String), Known> = HashMap::new();
    let mut work: VecDeque<(String, String, Known)> = VecDeque::new();
    let Some(entry_op) = find_func(module, entry) else {
        return Err(err(
            module.top.pos,
            &format!("an entry function `@{entry}`"),
            "no such function",
        ));
    };
    let entry_args = entry_op
        .regions
        .first()
        .and_then(|r| r.blocks.first())
        .map(|b| b.args.clone())
        .unwrap_or_default();
    for (i, s) in arg_shardings(entry_op)?.into_iter().enumerate() {
        if let (Some(s), Some(a)) = (s, entry_args.get(i)) {
            if s.is_split() {
                let origin = describe_arg(i, entry_op, aliases);
                work.push_back((
                    entry.to_string(),
                    a.name.clone(),
                    Known {
                        sharding: s,
                        origin,
                    },
                ));
            }
        }
    }
    for f in module.functions() {
        let fname = func_name(f).unwrap_or_default();
        let mut err_out = None;
        f.walk_nested(&mut |op| {
            if op.name == "sdy.sharding_constraint" {
                let Some(text) = op.prop("sharding") else {
                    return;
                };
                match parse_sharding(text, op.pos, "a sharding constraint") {
                    Ok(s) if s.is_split() => {
                        let origin = match loc_json(&op.loc, aliases) {
                            Value::String(l) => format!("the value constrained at {l}"),
                            _ => format!("the value constrained at line {}", op.pos.line),
                        };
                        for r in op.result_names() {
                            work.push_back((
                                fname.clone(),
                                r,
                                Known {
                                    sharding: s.clone(),
                                    origin: origin.clone(),
                                },
                            ));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => err_out = Some(e),
                }
            }
        });
        if let Some(e) = err_out {
            return Err(e);
        }
    }
    while let Some((func, value, k)) = work.pop_front() {
        let key = (func.clone(), value.clone());
        if let Some(prev) = known.get(&key) {
            if prev.sharding != k.sharding {
                return Err(err(
                    Pos::default(),
                    &format!(
                        "one sharding for `{value}` in @{func} ({} reaches it as {:?})",
                        prev.origin, prev.sharding.dims
                    ),
                    &format!("{} reaching it as {:?}", k.origin, k.sharding.dims),
                ));
            }
            continue;
        }
        known.insert(key, k.clone());
        let Some(f) = find_func(module, &func) else {
            continue;
        };
        f.walk_nested(&mut |op| {
            for (i, o) in op.operands.iter().enumerate() {
                if *o != value {
                    continue;
                }
                match op.name.as_str() {
                    "stablehlo.while" => {
                        for r in &op.regions {
                            if let Some(a) = r.blocks.first().and_then(|b| b.args.get(i)) {
                                work.push_back((func.clone(), a.name.clone(), k.clone()));
                            }
                        }
                        let body = op.regions.get(1).and_then(|r| r.blocks.first());
                        let passes = body.is_some_and(|b| {
                            let ret = b.ops.last();
                            let arg = b.args.get(i).map(|a| a.name.clone());
                            ret.and_then(|r| r.operands.get(i)).cloned() == arg
                        });
                        if passes {
                            if let Some(r) = op.result_names().get(i) {
                                work.push_back((func.clone(), r.clone(), k.clone()));
                            }
                        }
                    }
                    "func.call" => {
                        let callee = op
                            .prop("callee")
                            .and_then(|c| c.trim().strip_prefix('@'))
                            .map(str::to_string);
                        if let Some(callee) = callee {
                            if let Some(a) = find_func(module, &callee)
                                .and_then(|c| c.regions.first())
                                .and_then(|r| r.blocks.first())
                                .and_then(|b| b.args.get(i))
                            {
                                work.push_back((callee.clone(), a.name.clone(), k.clone()));
                            }
                        }
                    }
                    "stablehlo.custom_call"
                        if i == 0 && target(op).as_deref() == Some("fp8xla_update_slice") =>
                    {
                        for r in op.result_names() {
                            work.push_back((func.clone(), r, k.clone()));
                        }
                    }
                    _ => {}
                }
            }
        });
    }
    Ok(known)
}

fn target(op: &Op) -> Option<String> {
    unquote(op.prop("call_target_name")?).map(str::to_string)
}

/// The integers of a call's backend configuration: `backend_config = {lhs_contracting_dims =
/// array<i64: 1>, w_scale_dim = 1 : i64, …}` (what the passes emit) or `mhlo.backend_config =
/// {lhs_contracting_dims = dense<1> : tensor<1xi64>, …}` (what `jax.ffi.ffi_call` writes).
fn backend_ints(op: &Op) -> HashMap<String, Vec<i64>> {
    let mut out = HashMap::new();
    let text = op
        .prop("backend_config")
        .filter(|t| t.trim().starts_with('{'))
        .or_else(|| op.attributes.as_ref()?.get("mhlo.backend_config"));
    let Some(text) = text else {
        return out;
    };
    let inner = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or("");
    for e in split_top(inner) {
        if let Some((k, v)) = e.split_once('=') {
            if let Some(ints) = parse_ints(v.trim()) {
                out.insert(k.trim().to_string(), ints);
            }
        }
    }
    out
}

/// `array<i64: 1, 0>`, `dense<[1, 0]> : tensor<2xi64>`, `dense<1> : tensor<1xi64>`,
/// `dense<> : tensor<0xi64>` or `3 : i64`.
fn parse_ints(v: &str) -> Option<Vec<i64>> {
    if let Some(a) = super::attr::parse_array_i64(v) {
        return Some(a);
    }
    if let Some(d) = v.strip_prefix("dense<") {
        let (body, ty) = d.split_once('>')?;
        if !ty.contains("i64") && !ty.contains("i32") {
            return None;
        }
        let body = body.trim().trim_start_matches('[').trim_end_matches(']');
        if body.trim().is_empty() {
            return Some(Vec::new());
        }
        let ints: Option<Vec<i64>> = body.split(',').map(|x| x.trim().parse().ok()).collect();
        // A splat (`dense<1> : tensor<3xi64>`) repeats its one value.
        let n: Option<usize> = ty
            .split("tensor<")
            .nth(1)
            .and_then(|t| t.split('x').next())
            .and_then(|t| t.parse().ok());
        return match (ints, n) {
            (Some(i), Some(n)) if i.len() == 1 && n > 1 => Some(vec![i[0]; n]),
            (i, _) => i,
        };
    }
    let (n, ty) = v.split_once(':')?;
    if !ty.trim().starts_with('i') {
        return None;
    }
    n.trim().parse().ok().map(|n| vec![n])
}

/// How one call is split: the axes of each operand's and the result's dimensions, the axes
/// the partial results are summed over, and whether the take is vocab parallel.
#[derive(Debug)]
struct Plan {
    mesh: String,
    operands: Vec<Vec<Vec<String>>>,
    result: Vec<Vec<String>>,
    reduce: Vec<String>,
    /// `fp8xla_take` on a row-split table: (rows per device, the axes of the rows).
    vocab: Option<(u64, Vec<String>)>,
    /// Manual over every mesh axis (not only those the operands are split on).
    all_manual: bool,
}

fn rank(t: &Type) -> usize {
    t.as_tensor().map_or(0, |t| t.rank())
}

fn static_dims(t: &Type) -> Vec<u64> {
    t.as_tensor()
        .map(|t| {
            t.dims
                .iter()
                .map(|d| match d {
                    Dim::Static(n) => *n,
                    Dim::Dynamic => 0,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The plan of a `dot_general`-like call whose operand `side` (0 lhs, 1 rhs) has `axes`.
fn plan_dot(op: &Op, side: usize, axes: &[Vec<String>]) -> Result<Plan, String> {
    let b = backend_ints(op);
    let get = |k: &str| b.get(k).cloned().unwrap_or_default();
    let (lc, rc, lb, rb) = (
        get("lhs_contracting_dims"),
        get("rhs_contracting_dims"),
        get("lhs_batching_dims"),
        get("rhs_batching_dims"),
    );
    let ranks = [rank(&op.operand_types[0]), rank(&op.operand_types[1])];
    let (own_c, other_c, own_b, other_b) = if side == 0 {
        (&lc, &rc, &lb, &rb)
    } else {
        (&rc, &lc, &rb, &lb)
    };
    let free = |r: usize, c: &[i64], bt: &[i64]| -> Vec<usize> {
        (0..r)
            .filter(|d| !c.contains(&(*d as i64)) && !bt.contains(&(*d as i64)))
            .collect()
    };
    let lhs_free = free(ranks[0], &lc, &lb);
    let rhs_free = free(ranks[1], &rc, &rb);
    let mut operands = vec![vec![Vec::new(); ranks[0]], vec![Vec::new(); ranks[1]]];
    let mut result = vec![Vec::new(); rank(&op.result_types[0])];
    let mut reduce = Vec::new();
    let other = 1 - side;
    for (d, a) in axes.iter().enumerate() {
        if a.is_empty() {
            continue;
        }
        operands[side][d] = a.clone();
        if let Some(i) = own_c.iter().position(|&x| x == d as i64) {
            operands[other][other_c[i] as usize] = a.clone();
            reduce.extend(a.iter().cloned());
        } else if let Some(i) = own_b.iter().position(|&x| x == d as i64) {
            operands[other][other_b[i] as usize] = a.clone();
            result[i] = a.clone();
        } else {
            let nb = lb.len();
            let at = if side == 0 {
                nb + lhs_free.iter().position(|&x| x == d).ok_or("bad dims")?
            } else {
                nb + lhs_free.len() + rhs_free.iter().position(|&x| x == d).ok_or("bad dims")?
            };
            *result.get_mut(at).ok_or("a result of the wrong rank")? = a.clone();
        }
    }
    // Per-channel scales (fp8xla_matmul's third operand) run along weight dim `w_scale_dim`,
    // or without it over the weight's batch × free dims (one dim: that one).
    let kept: Vec<usize> = (0..ranks[1])
        .filter(|d| !rc.contains(&(*d as i64)))
        .collect();
    for t in op.operand_types.iter().skip(2) {
        let dim = match b.get("w_scale_dim").and_then(|v| v.first()) {
            Some(&d) => Some(d as usize),
            None if kept.len() == 1 => Some(kept[0]),
            None => None,
        };
        let spec = match (rank(t), dim) {
            (1, Some(d)) => vec![operands[1].get(d).cloned().unwrap_or_default()],
            (r, None) if kept.iter().any(|&d| !operands[1][d].is_empty()) => {
                return Err(format!(
                    "per-channel scales over {} weight dims (rank {r}) on a split weight; \
                     give `w_scale_dim`",
                    kept.len()
                ))
            }
            (r, _) => vec![Vec::new(); r],
        };
        operands.push(spec);
    }
    Ok(Plan {
        mesh: String::new(),
        operands,
        result,
        reduce,
        vocab: None,
        all_manual: false,
    })
}

/// The plan of one call, `None` when it is not split or not a call this pass splits.
fn plan(
    op: &Op,
    shardings: &[Option<&Known>],
    meshes: &HashMap<String, Mesh>,
) -> Result<Option<Plan>, RewriteError> {
    let Some(name) = target(op) else {
        return Ok(None);
    };
    if name == OBSERVE {
        let usable = meshes
            .iter()
            .filter(|(_, m)| m.devices() > 1 && !m.device_ids)
            .map(|(name, _)| name);
        let (Some(mesh), Some(t)) = (usable.min(), op.operand_types.first()) else {
            return Ok(None);
        };
        return Ok(Some(Plan {
            mesh: mesh.clone(),
            operands: vec![vec![Vec::new(); rank(t)]],
            result: vec![Vec::new(); rank(t)],
            reduce: Vec::new(),
            vocab: None,
            all_manual: true,
        }));
    }
    let split: Vec<(usize, &Known)> = shardings
        .iter()
        .enumerate()
        .filter_map(|(i, k)| k.map(|k| (i, k)))
        .filter(|(_, k)| k.sharding.is_split())
        .collect();
    let Some(&(side, known)) = split.first() else {
        return Ok(None);
    };
    let s = &known.sharding;
    let fail = |expected: &str, found: String| err(op.pos, expected, &found);
    let mesh = meshes.get(&s.mesh).ok_or_else(|| {
        fail(
            "a sharding on a mesh the module defines",
            format!("{} on the unknown mesh @{}", known.origin, s.mesh),
        )
    })?;
    if mesh.device_ids {
        return Err(fail(
            "a mesh in the default device order (explicit `device_ids` are not supported)",
            format!(
                "{} sharded over @{}, which has device_ids",
                known.origin, s.mesh
            ),
        ));
    }
    if split.len() > 1 {
        return Err(fail(
            &format!("{name} with at most one sharded operand"),
            format!("{} and {} both sharded", known.origin, split[1].1.origin),
        ));
    }
    // Every split dimension divides evenly.
    let dims = static_dims(&op.operand_types[side]);
    if s.dims.len() != dims.len() {
        return Err(fail(
            &format!("a sharding of rank {} for {}", dims.len(), known.origin),
            format!("rank {}", s.dims.len()),
        ));
    }
    for (d, axes) in s.dims.iter().enumerate() {
        let parts: u64 = axes.iter().map(|a| mesh.size(a)).product();
        if parts > 1 && (dims[d] == 0 || !dims[d].is_multiple_of(parts)) {
            return Err(fail(
                &format!(
                    "dimension {d} of {} (size {}) divisible by the mesh axes {:?} it is split over",
                    known.origin,
                    if dims[d] == 0 { "dynamic".to_string() } else { dims[d].to_string() },
                    axes
                ),
                format!("{parts} parts"),
            ));
        }
    }
    let mut p = match name.as_str() {
        "fp8xla_matmul" | "fp8xla_dot_f32" if side <= 1 => {
            plan_dot(op, side, &s.dims).map_err(|why| fail("a well-formed dot call", why))?
        }
        "fp8xla_update_slice" if side == 0 => {
            let update = static_dims(&op.operand_types[1]);
            for (d, axes) in s.dims.iter().enumerate() {
                if !axes.is_empty() && update.get(d) != dims.get(d) {
                    return Err(fail(
                        &format!(
                            "an update whole along dimension {d}, which {} is split on",
                            known.origin
                        ),
                        format!("update size {:?} of {}", update.get(d), dims[d]),
                    ));
                }
            }
            let mut operands = vec![s.dims.clone(), s.dims.clone()];
            operands.extend(
                op.operand_types
                    .iter()
                    .skip(2)
                    .map(|t| vec![Vec::new(); rank(t)]),
            );
            Plan {
                mesh: String::new(),
                operands,
                result: s.dims.clone(),
                reduce: Vec::new(),
                vocab: None,
                all_manual: false,
            }
        }
        "fp8xla_take" if side == 0 => {
            let idx_rank = rank(&op.operand_types[1]);
            let mut result = vec![Vec::new(); rank(&op.result_types[0])];
            if let (Some(last), Some(cols)) = (result.last_mut(), s.dims.last()) {
                *last = cols.clone();
            }
            let rows = &s.dims[0];
            let vocab = (!rows.is_empty()).then(|| {
                let parts: u64 = rows.iter().map(|a| mesh.size(a)).product();
                (dims[0] / parts, rows.clone())
            });
            // Operand 2, the per-row scales (one per table row), is split like the rows.
            let mut operands = vec![s.dims.clone(), vec![Vec::new(); idx_rank]];
            operands.extend(op.operand_types.iter().skip(2).map(|_| vec![rows.clone()]));
            Plan {
                mesh: String::new(),
                operands,
                result,
                reduce: rows.clone(),
                vocab,
                all_manual: false,
            }
        }
        _ => return Ok(None),
    };
    p.mesh = s.mesh.clone();
    Ok(Some(p))
}

/// `[{}, {"model"}]` (closed dimensions when every mesh axis is manual; otherwise open, so
/// that Shardy may still split the other axes, as `shard_map` with `axis_names` writes it).
fn dims_text(dims: &[Vec<String>], open: bool) -> String {
    let items: Vec<String> = dims
        .iter()
        .map(|axes| {
            let mut names: Vec<String> = axes.iter().map(|a| format!("\"{a}\"")).collect();
            if open {
                names.push("?".into());
            }
            format!("{{{}}}", names.join(", "))
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn local_type(t: &Type, axes: &[Vec<String>], mesh: &Mesh) -> Type {
    match t {
        Type::Tensor(tt) => {
            let mut tt = tt.clone();
            for (d, a) in tt.dims.iter_mut().zip(axes) {
                let parts: u64 = a.iter().map(|x| mesh.size(x)).product();
                if let Dim::Static(n) = d {
                    *n /= parts.max(1);
                }
            }
            Type::Tensor(tt)
        }
        other => other.clone(),
    }
}

/// Device groups that sum over `axes` (device ids in the mesh's row-major order).
fn replica_groups(mesh: &Mesh, axes: &[String]) -> String {
    let n = mesh.devices();
    let mut groups: BTreeMap<Vec<u64>, Vec<u64>> = BTreeMap::new();
    for d in 0..n {
        let mut rest = d;
        let mut coords = vec![0; mesh.axes.len()];
        for (i, (_, size)) in mesh.axes.iter().enumerate().rev() {
            coords[i] = rest % size;
            rest /= size;
        }
        let key: Vec<u64> = mesh
            .axes
            .iter()
            .zip(&coords)
            .filter(|((a, _), _)| !axes.contains(a))
            .map(|(_, c)| *c)
            .collect();
        groups.entry(key).or_default().push(d);
    }
    let size = groups.values().next().map_or(0, |g| g.len());
    let rows: Vec<String> = groups
        .values()
        .map(|g| {
            let items: Vec<String> = g.iter().map(|x| x.to_string()).collect();
            format!("[{}]", items.join(", "))
        })
        .collect();
    format!(
        "dense<[{}]> : tensor<{}x{}xi64>",
        rows.join(", "),
        groups.len(),
        size
    )
}

/// The largest channel handle in the module (new collectives take the next ones).
fn max_channel_handle(module: &Module) -> i64 {
    let mut max = 0;
    module.top.walk(&mut |op| {
        if let Some(h) = op.prop("channel_handle") {
            if let Some(n) = h
                .split("handle = ")
                .nth(1)
                .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|t| t.parse::<i64>().ok())
            {
                max = max.max(n);
            }
        }
    });
    max
}

/// Builds ops; ids and names are fresh in the module.
struct Builder<'a> {
    module: &'a mut Module,
    names: Names,
    next_handle: i64,
}

impl Builder<'_> {
    fn op(&mut self, pos: Pos, result: Option<&str>, name: &str, operands: &[(&str, &Type)]) -> Op {
        Op::simple(
            self.module.fresh_id(),
            pos,
            result,
            name,
            operands.iter().map(|(v, _)| v.to_string()).collect(),
            operands.iter().map(|(_, t)| (*t).clone()).collect(),
            vec![],
            None,
        )
    }

    /// `name(operands) : … -> ty` with `props`, returning the op and its result name.
    #[allow(clippy::too_many_arguments)]
    fn value(
        &mut self,
        body: &mut Vec<Op>,
        pos: Pos,
        name: &str,
        operands: &[(&str, &Type)],
        ty: &Type,
        props: Vec<(&str, String)>,
        loc: &Option<String>,
    ) -> String {
        let r = self.names.fresh();
        let mut op = self.op(pos, Some(&r), name, operands);
        op.result_types = vec![ty.clone()];
        op.loc = loc.clone();
        if !props.is_empty() {
            set_props(&mut op, props);
        }
        body.push(op);
        r
    }

    /// `all_reduce(sum)` of `x` over `axes`.
    #[allow(clippy::too_many_arguments)]
    fn all_reduce(
        &mut self,
        body: &mut Vec<Op>,
        x: &str,
        ty: &Type,
        mesh: &Mesh,
        axes: &[String],
        pos: Pos,
        loc: &Option<String>,
    ) -> String {
        let element = ty
            .as_tensor()
            .map_or(ElementType::F32, |t| t.element.clone());
        let scalar = Type::Tensor(TensorType {
            dims: vec![],
            element,
            encoding: None,
        });
        let (a, b, s) = (self.names.fresh(), self.names.fresh(), self.names.fresh());
        let mut add = self.op(
            pos,
            Some(&s),
            "stablehlo.add",
            &[(&a, &scalar), (&b, &scalar)],
        );
        add.result_types = vec![scalar.clone()];
        add.loc = loc.clone();
        let mut ret = self.op(pos, None, "stablehlo.return", &[(&s, &scalar)]);
        ret.loc = loc.clone();
        let arg = |name: &str| BlockArg {
            name: name.to_string(),
            ty: scalar.clone(),
            loc: loc.clone(),
        };
        let r = self.names.fresh();
        let mut op = self.op(pos, Some(&r), "stablehlo.all_reduce", &[(x, ty)]);
        op.result_types = vec![ty.clone()];
        op.loc = loc.clone();
        op.parenthesized_result = false;
        op.regions = vec![Region {
            blocks: vec![Block {
                label: Some("^bb0".into()),
                args: vec![arg(&a), arg(&b)],
                ops: vec![add, ret],
            }],
        }];
        let handle = self.next_handle;
        self.next_handle += 1;
        op.properties = Some(AttrDict {
            entries: vec![
                Attr {
                    name: "channel_handle".into(),
                    value: Some(format!(
                        "#stablehlo.channel_handle<handle = {handle}, type = 0>"
                    )),
                },
                Attr {
                    name: "replica_groups".into(),
                    value: Some(replica_groups(mesh, axes)),
                },
                Attr {
                    name: "use_global_device_ids".into(),
                    value: None,
                },
            ],
        });
        body.push(op);
        r
    }
}

/// Replaces the call `id` with a manual computation holding it.
fn wrap(b: &mut Builder, id: u32, p: &Plan, mesh: &Mesh) -> Result<(), RewriteError> {
    let call = b.module.top.find(id).expect("call exists").clone();
    let pos = call.pos;
    let loc = call.loc.clone();
    let mut manual: Vec<String> = Vec::new();
    for (axis, _) in &mesh.axes {
        let used = p
            .operands
            .iter()
            .chain(std::iter::once(&p.result))
            .flatten()
            .flatten()
            .chain(&p.reduce)
            .any(|a| a == axis);
        if used || p.all_manual {
            manual.push(axis.clone());
        }
    }
    let open = manual.len() < mesh.axes.len();
    let per_value = |specs: Vec<&Vec<Vec<String>>>| {
        let items: Vec<String> = specs
            .iter()
            .map(|d| format!("<@{}, {}>", p.mesh, dims_text(d, open)))
            .collect();
        format!("#sdy.sharding_per_value<[{}]>", items.join(", "))
    };
    let manual_text = manual
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");

    // The body: block arguments of local types, the call, the collectives, sdy.return.
    let mut args = Vec::new();
    let mut local_operands = Vec::new();
    for (t, axes) in call.operand_types.iter().zip(&p.operands) {
        let name = b.names.fresh();
        let lt = local_type(t, axes, mesh);
        args.push(BlockArg {
            name: name.clone(),
            ty: lt.clone(),
            loc: loc.clone(),
        });
        local_operands.push((name, lt));
    }
    let result_ty = call.result_types[0].clone();
    let local_result = local_type(&result_ty, &p.result, mesh);
    let mut body = Vec::new();
    let mut inner = call.clone();
    inner.id = b.module.fresh_id();
    let mut out = b.names.fresh();
    inner.results[0].name = out.clone();
    inner.operands = local_operands.iter().map(|(n, _)| n.clone()).collect();
    inner.operand_types = local_operands.iter().map(|(_, t)| t.clone()).collect();
    inner.result_types = vec![local_result.clone()];
    if let Some((rows, axes)) = &p.vocab {
        out = vocab_take(
            b,
            &mut body,
            inner,
            &local_operands,
            &local_result,
            *rows,
            axes,
            mesh,
        )?;
    } else {
        body.push(inner);
    }
    if !p.reduce.is_empty() {
        out = b.all_reduce(&mut body, &out, &local_result, mesh, &p.reduce, pos, &loc);
    }
    let mut ret = b.op(pos, None, "sdy.return", &[(&out, &local_result)]);
    ret.loc = loc.clone();
    body.push(ret);

    let mut mc = call.clone();
    mc.name = "sdy.manual_computation".into();
    mc.attributes = None;
    mc.parenthesized_result = false;
    mc.regions = vec![Region {
        blocks: vec![Block {
            label: Some("^bb0".into()),
            args,
            ops: body,
        }],
    }];
    mc.properties = Some(AttrDict {
        entries: vec![
            Attr {
                name: "in_shardings".into(),
                value: Some(per_value(p.operands.iter().collect())),
            },
            Attr {
                name: "manual_axes".into(),
                value: Some(format!("#sdy<manual_axes{{{manual_text}}}>")),
            },
            Attr {
                name: "out_shardings".into(),
                value: Some(per_value(vec![&p.result])),
            },
        ],
    });
    let slot = b.module.top.find_mut(id).expect("call exists");
    *slot = mc;
    Ok(())
}

/// The body of a vocab-parallel take: each device takes the rows it holds (indices shifted
/// by its first row, clamped), and zeros the rows of other devices; the caller sums.
#[allow(clippy::too_many_arguments)]
fn vocab_take(
    b: &mut Builder,
    body: &mut Vec<Op>,
    mut take: Op,
    operands: &[(String, Type)],
    result: &Type,
    rows: u64,
    axes: &[String],
    mesh: &Mesh,
) -> Result<String, RewriteError> {
    let pos = take.pos;
    let loc = take.loc.clone();
    let (idx, idx_ty) = (&operands[1].0, &operands[1].1);
    let Some(it) = idx_ty.as_tensor().cloned() else {
        return Err(err(
            pos,
            "tensor indices of fp8xla_take",
            &format!("`{idx_ty}`"),
        ));
    };
    let scalar = |e: ElementType| {
        Type::Tensor(TensorType {
            dims: vec![],
            element: e,
            encoding: None,
        })
    };
    let u32t = scalar(ElementType::Int {
        width: 32,
        unsigned: true,
    });
    let is = scalar(it.element.clone());
    // The device's position along `axes` (row-major over them) from its partition id.
    let pid = b.value(
        body,
        pos,
        "stablehlo.partition_id",
        &[],
        &u32t,
        vec![],
        &loc,
    );
    let pid = b.value(
        body,
        pos,
        "stablehlo.convert",
        &[(&pid, &u32t)],
        &is,
        vec![],
        &loc,
    );
    let konst = |b: &mut Builder, body: &mut Vec<Op>, v: u64| {
        b.value(
            body,
            pos,
            "stablehlo.constant",
            &[],
            &is,
            vec![("value", format!("dense<{v}> : {is}"))],
            &loc,
        )
    };
    let mut index: Option<String> = None;
    let mut stride_after = 1u64;
    let mut strides = Vec::new();
    for (a, size) in mesh.axes.iter().rev() {
        strides.push((a.clone(), *size, stride_after));
        stride_after *= size;
    }
    strides.reverse();
    for (a, size, stride) in strides {
        if !axes.contains(&a) {
            continue;
        }
        let st = konst(b, body, stride);
        let q = b.value(
            body,
            pos,
            "stablehlo.divide",
            &[(&pid, &is), (&st, &is)],
            &is,
            vec![],
            &loc,
        );
        let sz = konst(b, body, size);
        let c = b.value(
            body,
            pos,
            "stablehlo.remainder",
            &[(&q, &is), (&sz, &is)],
            &is,
            vec![],
            &loc,
        );
        index = Some(match index {
            None => c,
            Some(prev) => {
                let m = b.value(
                    body,
                    pos,
                    "stablehlo.multiply",
                    &[(&prev, &is), (&sz, &is)],
                    &is,
                    vec![],
                    &loc,
                );
                b.value(
                    body,
                    pos,
                    "stablehlo.add",
                    &[(&m, &is), (&c, &is)],
                    &is,
                    vec![],
                    &loc,
                )
            }
        });
    }
    let index = index.expect("a row-split table has axes");
    let nrows = konst(b, body, rows);
    let first = b.value(
        body,
        pos,
        "stablehlo.multiply",
        &[(&index, &is), (&nrows, &is)],
        &is,
        vec![],
        &loc,
    );
    let first_b = b.value(
        body,
        pos,
        "stablehlo.broadcast_in_dim",
        &[(&first, &is)],
        idx_ty,
        vec![("broadcast_dimensions", "array<i64>".into())],
        &loc,
    );
    let local = b.value(
        body,
        pos,
        "stablehlo.subtract",
        &[(idx, idx_ty), (&first_b, idx_ty)],
        idx_ty,
        vec![],
        &loc,
    );
    let zero = konst(b, body, 0);
    let last = konst(b, body, rows - 1);
    let clamped = b.value(
        body,
        pos,
        "stablehlo.clamp",
        &[(&zero, &is), (&local, idx_ty), (&last, &is)],
        idx_ty,
        vec![],
        &loc,
    );
    let bool_ty = Type::Tensor(it.with_element(ElementType::Int {
        width: 1,
        unsigned: false,
    }));
    let same = b.value(
        body,
        pos,
        "stablehlo.compare",
        &[(&local, idx_ty), (&clamped, idx_ty)],
        &bool_ty,
        vec![(
            "comparison_direction",
            "#stablehlo<comparison_direction EQ>".into(),
        )],
        &loc,
    );
    let taken = b.names.fresh();
    take.results[0].name = taken.clone();
    take.operands[1] = clamped;
    body.push(take);
    // Broadcast the mask over the embedding dimensions and zero the rows of other devices.
    let rt = result.as_tensor().cloned().ok_or_else(|| {
        err(
            pos,
            "a tensor result of fp8xla_take",
            &format!("`{result}`"),
        )
    })?;
    let mask_ty = Type::Tensor(rt.with_element(ElementType::Int {
        width: 1,
        unsigned: false,
    }));
    let bdims: Vec<i64> = (0..it.rank() as i64).collect();
    let mask = b.value(
        body,
        pos,
        "stablehlo.broadcast_in_dim",
        &[(&same, &bool_ty)],
        &mask_ty,
        vec![("broadcast_dimensions", super::attr::array_i64(&bdims))],
        &loc,
    );
    let et = scalar(rt.element.clone());
    let zf = b.value(
        body,
        pos,
        "stablehlo.constant",
        &[],
        &et,
        vec![("value", format!("dense<0.000000e+00> : {et}"))],
        &loc,
    );
    let zb = b.value(
        body,
        pos,
        "stablehlo.broadcast_in_dim",
        &[(&zf, &et)],
        result,
        vec![("broadcast_dimensions", "array<i64>".into())],
        &loc,
    );
    Ok(b.value(
        body,
        pos,
        "stablehlo.select",
        &[(&mask, &mask_ty), (&taken, result), (&zb, result)],
        result,
        vec![],
        &loc,
    ))
}

/// Rewrites every fp8xla call with a sharded operand; returns one report entry per call.
pub fn shard_calls(
    module: &mut Module,
    entry: &str,
    aliases: &HashMap<String, String>,
) -> Result<Vec<Value>, RewriteError> {
    let meshes = meshes(module)?;
    // Only meshes of one device (e.g. `#sdy.mesh<[], device_ids=[0]>`): nothing to split.
    if !meshes.values().any(|m| m.devices() > 1) {
        return Ok(Vec::new());
    }
    let elementwise = mark_elementwise(module, aliases);
    let known = follow(module, entry, aliases)?;
    // Plan every call first (the module is read-only meanwhile).
    let mut plans: Vec<(u32, Plan, String, Value)> = Vec::new();
    for f in module.functions() {
        let fname = func_name(f).unwrap_or_default();
        let mut result = Ok(());
        f.walk_nested(&mut |op| {
            if result.is_err() || op.name != "stablehlo.custom_call" {
                return;
            }
            let shardings: Vec<Option<&Known>> = op
                .operands
                .iter()
                .map(|v| known.get(&(fname.clone(), v.clone())))
                .collect();
            match plan(op, &shardings, &meshes) {
                Ok(Some(p)) => {
                    plans.push((op.id, p, fname.clone(), loc_json(&op.loc, aliases)));
                }
                Ok(None) => {}
                Err(e) => result = Err(e),
            }
        });
        result?;
    }
    let next_handle = max_channel_handle(module) + 1;
    let names = Names::new(module);
    let mut b = Builder {
        module,
        names,
        next_handle,
    };
    let mut report = elementwise;
    for (id, p, function, loc) in plans {
        let mesh = meshes[&p.mesh].clone();
        let call_target = b.module.top.find(id).and_then(target).unwrap_or_default();
        wrap(&mut b, id, &p, &mesh)?;
        let how = if p.all_manual {
            "on the whole operand on every device".to_string()
        } else if p.vocab.is_some() {
            "vocab parallel (rows split), one all-reduce".to_string()
        } else if !p.reduce.is_empty() {
            format!("row parallel, one all-reduce over {:?}", p.reduce)
        } else {
            "split without a collective".to_string()
        };
        report.push(json!({
            "kind": "shard", "function": function, "loc": loc,
            "detail": format!(
                "{call_target} in a manual computation: operands {:?} → result {:?}, {how}",
                p.operands, p.result
            ),
        }));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meshes_and_shardings() {
        let m = parse_mesh("#sdy.mesh<[\"data\"=1, \"model\"=2]>", Pos::default()).unwrap();
        assert_eq!(m.axes, vec![("data".into(), 1), ("model".into(), 2)]);
        assert!(!m.device_ids);
        let m = parse_mesh("#sdy.mesh<[\"a\"=2], device_ids=[1, 0]>", Pos::default()).unwrap();
        assert!(m.device_ids);
        let m = parse_mesh("#sdy.mesh<[], device_ids=[0]>", Pos::default()).unwrap();
        assert!(m.axes.is_empty());
        let s = parse_sharding(
            "#sdy.sharding<@mesh, [{\"model\", ?}p1, {}, {?}]>",
            Pos::default(),
            "x",
        )
        .unwrap();
        assert_eq!(s.mesh, "mesh");
        assert_eq!(s.dims, vec![vec!["model".to_string()], vec![], vec![]]);
        let e = parse_sharding(
            "#sdy.sharding<@mesh, [{\"model\":(1)2}]>",
            Pos::default(),
            "x",
        )
        .unwrap_err();
        assert!(e.expected.contains("sub-axes"), "{e}");
    }

    #[test]
    fn replica_groups_sum_over_the_named_axes() {
        let m = Mesh {
            axes: vec![("data".into(), 2), ("model".into(), 2)],
            device_ids: false,
        };
        assert_eq!(
            replica_groups(&m, &["model".into()]),
            "dense<[[0, 1], [2, 3]]> : tensor<2x2xi64>"
        );
        assert_eq!(
            replica_groups(&m, &["data".into()]),
            "dense<[[0, 2], [1, 3]]> : tensor<2x2xi64>"
        );
    }
}

#[cfg(test)]
mod pass_tests {
    use super::super::run_pass;

    /// x @ w as `fp8xla_matmul` (what `quantize` emits), the weight sharded as `sharding`.
    fn module(sharding: &str, w_dims: &str) -> String {
        format!(
            r#""builtin.module"() <{{sym_name = "m"}}> ({{
  "sdy.mesh"() <{{mesh = #sdy.mesh<["model"=2]>, sym_name = "mesh"}}> : () -> ()
  "func.func"() <{{arg_attrs = [{{sdy.sharding = #sdy.sharding<@mesh, [{{}}, {{}}]>}}, {{sdy.sharding = #sdy.sharding<@mesh, {sharding}>}}], function_type = (tensor<3x8xf32>, tensor<{w_dims}xf8E4M3FN>) -> tensor<3x6xf32>, sym_name = "main", sym_visibility = "public"}}> ({{
  ^bb0(%arg0: tensor<3x8xf32> loc("x"), %arg1: tensor<{w_dims}xf8E4M3FN> loc("w")):
    %0 = "stablehlo.custom_call"(%arg0, %arg1) <{{api_version = 4 : i32, backend_config = {{lhs_batching_dims = array<i64>, lhs_contracting_dims = array<i64: 1>, rhs_batching_dims = array<i64>, rhs_contracting_dims = array<i64: 0>, w_scale = 1.000000000e+00 : f32}}, call_target_name = "fp8xla_matmul"}}> : (tensor<3x8xf32>, tensor<{w_dims}xf8E4M3FN>) -> tensor<3x6xf32>
    "func.return"(%0) : (tensor<3x6xf32>) -> ()
  }}) : () -> ()
}}) : () -> ()
"#
        )
    }

    #[test]
    fn column_parallel_needs_no_collective() {
        let (out, report) =
            run_pass("shard_calls", &module(r#"[{}, {"model"}]"#, "8x6"), "{}").expect("rewrites");
        assert!(
            out.contains("\"sdy.manual_computation\"(%arg0, %arg1)"),
            "{out}"
        );
        assert!(out.contains(
            r#"in_shardings = #sdy.sharding_per_value<[<@mesh, [{}, {}]>, <@mesh, [{}, {"model"}]>]>"#
        ), "{out}");
        assert!(
            out.contains(r#"out_shardings = #sdy.sharding_per_value<[<@mesh, [{}, {"model"}]>]>"#),
            "{out}"
        );
        assert!(
            out.contains("(tensor<3x8xf32>, tensor<8x3xf8E4M3FN>) -> tensor<3x3xf32>"),
            "{out}"
        );
        assert!(!out.contains("all_reduce"), "{out}");
        assert!(report.contains("split without a collective"), "{report}");
    }

    #[test]
    fn row_parallel_sums_once() {
        let (out, _) =
            run_pass("shard_calls", &module(r#"[{"model"}, {}]"#, "8x6"), "{}").expect("rewrites");
        assert_eq!(out.matches("\"stablehlo.all_reduce\"").count(), 1, "{out}");
        assert!(
            out.contains("replica_groups = dense<[[0, 1]]> : tensor<1x2xi64>"),
            "{out}"
        );
        assert!(
            out.contains("(tensor<3x4xf32>, tensor<4x6xf8E4M3FN>) -> tensor<3x6xf32>"),
            "{out}"
        );
    }

    #[test]
    fn replicated_changes_nothing() {
        let m = module("[{}, {}]", "8x6");
        let (out, _) = run_pass("shard_calls", &m, "{}").expect("rewrites");
        assert!(!out.contains("manual_computation"), "{out}");
    }

    #[test]
    fn a_dimension_the_mesh_does_not_divide_is_named() {
        // 7 columns on 2 devices (the result type is wrong too, but the split is refused first).
        let e = run_pass("shard_calls", &module(r#"[{}, {"model"}]"#, "8x7"), "{}").unwrap_err();
        assert_eq!(e.stage, "shard_calls");
        assert!(
            e.expected
                .contains("dimension 1 of argument 1 (w) (size 7)"),
            "{e}"
        );
        assert_eq!(e.found, "2 parts", "{e}");
    }

    #[test]
    fn a_mesh_with_its_own_device_order_is_refused_only_when_used() {
        let used = module(r#"[{}, {"model"}]"#, "8x6").replace(
            r#"#sdy.mesh<["model"=2]>"#,
            r#"#sdy.mesh<["model"=2], device_ids=[1, 0]>"#,
        );
        let e = run_pass("shard_calls", &used, "{}").unwrap_err();
        assert!(e.found.contains("argument 1 (w) sharded over @mesh"), "{e}");
        let unused = module("[{}, {}]", "8x6").replace(
            r#"#sdy.mesh<["model"=2]>"#,
            r#"#sdy.mesh<["model"=2], device_ids=[1, 0]>"#,
        );
        run_pass("shard_calls", &unused, "{}").expect("a replicated module is left alone");
    }

    #[test]
    fn an_unknown_mesh_and_sub_axes_are_refused() {
        let m = module(r#"[{}, {"model"}]"#, "8x6")
            .replace("@mesh, [{}, {\"model\"}]", "@other, [{}, {\"model\"}]");
        let e = run_pass("shard_calls", &m, "{}").unwrap_err();
        assert!(e.found.contains("unknown mesh @other"), "{e}");
        let e = run_pass(
            "shard_calls",
            &module(r#"[{}, {"model":(1)2}]"#, "8x6"),
            "{}",
        )
        .unwrap_err();
        assert!(e.expected.contains("sub-axes are not supported"), "{e}");
    }
}
