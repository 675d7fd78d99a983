//! Following weight arguments through the module (shared by both passes).
//!
//! Starting from entry-function arguments (by index), a weight value is followed
//! - through `stablehlo.while` when the loop passes it through unchanged (loop operand k, the
//!   block argument k of the condition and the body, the body's return operand k, result k);
//! - through `func.call` into the callee's parameter (the callee is cloned first when it is
//!   public or called from more than one place, so each weight gets its own copy);
//! - through a `stablehlo.transpose` whose every use is a `dot_general` (tied logits).
//!
//! Sites are the `dot_general` ops with a weight operand, numbered in pre-order over the module
//! after this propagation (functions in module order, clones right after their original).

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::attr::{parse_array_i64, DotDims, FunctionType};
use super::ir::{ElementType, Module, Op, Pos, Type};
use super::RewriteError;

/// A value in a function: (function symbol name, value name).
pub type ValueKey = (String, String);

/// A transposed weight feeding only `dot_general`s.
#[derive(Clone, Debug)]
pub struct Transposed {
    /// Weight argument index.
    pub arg: usize,
    /// The transpose's permutation.
    pub perm: Vec<i64>,
    /// The transpose op.
    pub op: u32,
    /// The transposed (weight) value.
    pub source: String,
}

/// A use of a weight the passes will have to dequantize (unless they handle it).
#[derive(Clone, Debug)]
pub struct OtherUse {
    /// The using op.
    pub op: u32,
    /// Operand index.
    pub operand: usize,
    /// Weight argument index.
    pub arg: usize,
    /// Function holding the op.
    pub function: String,
    /// Why it is not followed (for the report).
    pub reason: String,
}

/// Something the propagation did, for the report.
#[derive(Clone, Debug)]
pub struct Event {
    /// `while`, `call`, `clone`, `transpose`.
    pub kind: &'static str,
    /// Weight argument index.
    pub arg: usize,
    /// Function holding the op.
    pub function: String,
    /// The op's location text.
    pub loc: Option<String>,
    /// Op position in the input.
    pub pos: Pos,
    /// Extra detail (operand index, callee, …).
    pub detail: String,
}

/// The result of following the weights.
#[derive(Default, Debug)]
pub struct Flow {
    /// Every value known to be a weight → its argument index.
    pub values: HashMap<ValueKey, usize>,
    /// Transposed weights feeding only dots.
    pub transposed: HashMap<ValueKey, Transposed>,
    /// `stablehlo.gather` ops with a weight as operand 0: (op, arg, function).
    pub gathers: Vec<(u32, usize, String)>,
    /// Other uses.
    pub other_uses: Vec<OtherUse>,
    /// What was followed.
    pub events: Vec<Event>,
    /// Loop-body returns passing a weight through: (return op, operand index).
    pub passthrough: std::collections::HashSet<(u32, usize)>,
}

/// A `dot_general` with a weight operand.
#[derive(Clone, Debug)]
pub struct Site {
    /// Site number.
    pub site: usize,
    /// The dot op.
    pub op: u32,
    /// Function holding it.
    pub function: String,
    /// Weight argument index.
    pub arg: usize,
    /// Operand index of the weight (1 = rhs, 0 = lhs).
    pub weight_operand: usize,
    /// The transpose between the weight and the dot, if any.
    pub transposed: Option<Transposed>,
    /// Dimension numbers of the dot.
    pub dims: DotDims,
    /// Whether the other operand is a weight too.
    pub both_weights: Option<usize>,
}

/// Name of a function op.
pub fn func_name(op: &Op) -> Option<String> {
    let v = op.prop("sym_name")?;
    Some(v.trim().trim_matches('"').to_string())
}

/// Calls `f(function name, op)` on every op nested in the module's functions, pre-order.
pub fn walk_functions_mut(module: &mut Module, f: &mut dyn FnMut(&str, &mut Op)) {
    for region in &mut module.top.regions {
        for block in &mut region.blocks {
            for func in block.ops.iter_mut().filter(|o| o.name == "func.func") {
                let name = func_name(func).unwrap_or_default();
                func.walk_mut(&mut |op| f(&name, op));
            }
        }
    }
}

/// The arguments of a function's entry block: type and location of each.
pub fn func_args(func: &Op) -> Vec<(Type, Option<String>)> {
    func.regions
        .first()
        .and_then(|r| r.blocks.first())
        .map(|b| {
            b.args
                .iter()
                .map(|a| (a.ty.clone(), a.loc.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The function op named `name`.
pub fn find_func<'m>(module: &'m Module, name: &str) -> Option<&'m Op> {
    module
        .functions()
        .into_iter()
        .find(|f| func_name(f).as_deref() == Some(name))
}

fn find_func_mut<'m>(module: &'m mut Module, name: &str) -> Option<&'m mut Op> {
    let id = find_func(module, name)?.id;
    module.top.find_mut(id)
}

/// Uses of `value` inside function `func`: (op id, operand index, op name).
pub fn uses_in(module: &Module, func: &str, value: &str) -> Vec<(u32, usize, String)> {
    let mut out = Vec::new();
    if let Some(f) = find_func(module, func) {
        f.walk_nested(&mut |op| {
            for (i, o) in op.operands.iter().enumerate() {
                if o == value {
                    out.push((op.id, i, op.name.clone()));
                }
            }
        });
    }
    out
}

fn retype(t: &mut Type, element: &ElementType) {
    if let Type::Tensor(tt) = t {
        tt.element = element.clone();
    }
}

fn callee_of(op: &Op) -> Option<String> {
    Some(op.prop("callee")?.trim().strip_prefix('@')?.to_string())
}

/// Follows the weights `args` (argument index → new element type, `None` to follow without
/// retyping) from the entry function `entry`.
pub fn follow(
    module: &mut Module,
    entry: &str,
    args: &BTreeMap<usize, Option<ElementType>>,
    stage: &'static str,
) -> Result<Flow, RewriteError> {
    let mut flow = Flow::default();
    let entry_op = find_func(module, entry).ok_or_else(|| {
        RewriteError::new(
            stage,
            Pos::default(),
            &format!("an entry function `@{entry}`"),
            "no such function",
        )
    })?;
    let entry_id = entry_op.id;
    let nargs = entry_op
        .regions
        .first()
        .and_then(|r| r.blocks.first())
        .map(|b| b.args.len())
        .unwrap_or(0);
    let mut work = VecDeque::new();
    for (&arg, element) in args {
        let f = module.top.find_mut(entry_id).expect("entry exists");
        let pos = f.pos;
        if arg >= nargs {
            return Err(RewriteError::new(
                stage,
                pos,
                &format!("a weight argument index below {nargs} (the arguments of @{entry})"),
                &format!("argument {arg}"),
            ));
        }
        let block = &mut f.regions[0].blocks[0];
        let a = &mut block.args[arg];
        match a.ty.as_tensor() {
            Some(t) if t.element.is_quantizable_float() => {}
            _ => {
                return Err(RewriteError::new(
                    stage,
                    pos,
                    &format!("argument {arg} of @{entry} to be a float tensor"),
                    &format!("`{}`", a.ty),
                ))
            }
        }
        let name = a.name.clone();
        if let Some(e) = element {
            retype(&mut a.ty, e);
            set_func_input(f, arg, e)?;
        }
        work.push_back((entry.to_string(), name, arg));
    }

    let mut seen = std::collections::HashSet::new();
    while let Some((func, value, arg)) = work.pop_front() {
        if !seen.insert((func.clone(), value.clone())) {
            continue;
        }
        flow.values.insert((func.clone(), value.clone()), arg);
        let element = args.get(&arg).cloned().flatten();
        for (id, k, name) in uses_in(module, &func, &value) {
            if flow.passthrough.contains(&(id, k)) {
                continue;
            }
            match name.as_str() {
                "stablehlo.dot_general" => {}
                "stablehlo.gather" if k == 0 => flow.gathers.push((id, arg, func.clone())),
                "stablehlo.while" => {
                    follow_while(module, &mut flow, &mut work, &func, id, k, arg, &element)
                }
                "func.call" => {
                    follow_call(module, &mut flow, &mut work, &func, id, k, arg, &element)?
                }
                "stablehlo.transpose" => follow_transpose(module, &mut flow, &func, id, arg),
                _ => flow.other_uses.push(OtherUse {
                    op: id,
                    operand: k,
                    arg,
                    function: func.clone(),
                    reason: format!("used by `{name}`"),
                }),
            }
        }
    }
    Ok(flow)
}

fn set_func_input(f: &mut Op, k: usize, element: &ElementType) -> Result<(), RewriteError> {
    let pos = f.pos;
    let text = f
        .prop("function_type")
        .ok_or_else(|| RewriteError::new("parser", pos, "a `function_type` property", "none"))?;
    let mut ft = FunctionType::parse(text, pos)?;
    match ft.inputs.get_mut(k) {
        Some(t) => retype(t, element),
        None => {
            return Err(RewriteError::new(
                "parser",
                pos,
                &format!("a function type with more than {k} inputs"),
                &format!("{} inputs", ft.inputs.len()),
            ))
        }
    }
    if let Some(p) = f.properties.as_mut() {
        p.set("function_type", ft.print());
    }
    Ok(())
}

fn event(op: &Op, kind: &'static str, arg: usize, function: &str, detail: String) -> Event {
    Event {
        kind,
        arg,
        function: function.to_string(),
        loc: op.loc.clone(),
        pos: op.pos,
        detail,
    }
}

#[allow(clippy::too_many_arguments)]
fn follow_while(
    module: &mut Module,
    flow: &mut Flow,
    work: &mut VecDeque<(String, String, usize)>,
    func: &str,
    id: u32,
    k: usize,
    arg: usize,
    element: &Option<ElementType>,
) {
    let Some(op) = module.top.find_mut(id) else {
        return;
    };
    let n = op.operands.len();
    let shape_ok = op.regions.len() == 2
        && op.result_types.len() == n
        && op.operand_types.len() == n
        && op.regions.iter().all(|r| {
            r.blocks.len() == 1 && r.blocks[0].args.len() == n && !r.blocks[0].ops.is_empty()
        });
    let passthrough = shape_ok && {
        let body = &op.regions[1].blocks[0];
        let ret = body.ops.last().expect("non-empty");
        ret.name == "stablehlo.return"
            && ret.operands.get(k) == Some(&body.args[k].name)
            && ret.operand_types.len() == n
    };
    if !passthrough {
        flow.other_uses.push(OtherUse {
            op: id,
            operand: k,
            arg,
            function: func.to_string(),
            reason: "loop operand not passed through the loop unchanged".to_string(),
        });
        return;
    }
    if let Some(e) = element {
        retype(&mut op.operand_types[k], e);
        retype(&mut op.result_types[k], e);
        for r in &mut op.regions {
            retype(&mut r.blocks[0].args[k].ty, e);
        }
        let body = &mut op.regions[1].blocks[0];
        let ret = body.ops.last_mut().expect("non-empty");
        retype(&mut ret.operand_types[k], e);
    }
    if let Some(ret) = op.regions[1].blocks[0].ops.last() {
        flow.passthrough.insert((ret.id, k));
    }
    let cond_arg = op.regions[0].blocks[0].args[k].name.clone();
    let body_arg = op.regions[1].blocks[0].args[k].name.clone();
    let result = op.result_names().get(k).cloned();
    flow.events.push(event(
        op,
        "while",
        arg,
        func,
        format!("loop-carried operand {k}"),
    ));
    work.push_back((func.to_string(), cond_arg, arg));
    work.push_back((func.to_string(), body_arg, arg));
    if let Some(r) = result {
        work.push_back((func.to_string(), r, arg));
    }
}

#[allow(clippy::too_many_arguments)]
fn follow_call(
    module: &mut Module,
    flow: &mut Flow,
    work: &mut VecDeque<(String, String, usize)>,
    func: &str,
    id: u32,
    k: usize,
    arg: usize,
    element: &Option<ElementType>,
) -> Result<(), RewriteError> {
    let Some(op) = module.top.find(id) else {
        return Ok(());
    };
    let op_loc = op.loc.clone();
    let op_pos = op.pos;
    let other = |reason: &str| OtherUse {
        op: id,
        operand: k,
        arg,
        function: func.to_string(),
        reason: reason.to_string(),
    };
    let Some(callee) = callee_of(op) else {
        flow.other_uses.push(other("call without a `callee`"));
        return Ok(());
    };
    let Some(callee_op) = find_func(module, &callee) else {
        flow.other_uses
            .push(other("callee not defined in the module"));
        return Ok(());
    };
    let params = callee_op
        .regions
        .first()
        .and_then(|r| r.blocks.first())
        .map(|b| b.args.len());
    if params != Some(op.operands.len()) {
        flow.other_uses
            .push(other("callee has no body matching the call"));
        return Ok(());
    }
    let public = !matches!(
        callee_op.prop("sym_visibility").map(str::trim),
        Some("\"private\"")
    );
    let mut callers = 0;
    module.top.walk(&mut |o| {
        if o.name == "func.call" && callee_of(o).as_deref() == Some(callee.as_str()) {
            callers += 1;
        }
    });
    let mut target = callee.clone();
    if public || callers > 1 {
        // Clone the callee for this call site.
        let mut clone = callee_op.clone();
        let callee_id = callee_op.id;
        let mut n = 0;
        let new_name = loop {
            let candidate = if n == 0 {
                format!("{callee}_fp8_{arg}")
            } else {
                format!("{callee}_fp8_{arg}_{n}")
            };
            if find_func(module, &candidate).is_none() {
                break candidate;
            }
            n += 1;
        };
        if let Some(p) = clone.properties.as_mut() {
            p.set("sym_name", format!("\"{new_name}\""));
            p.set("sym_visibility", "\"private\"".to_string());
        }
        module.renumber(&mut clone);
        module.insert_after(callee_id, vec![clone]);
        if let Some(call) = module.top.find_mut(id) {
            if let Some(p) = call.properties.as_mut() {
                p.set("callee", format!("@{new_name}"));
            }
        }
        flow.events.push(Event {
            kind: "clone",
            arg,
            function: func.to_string(),
            loc: op_loc.clone(),
            pos: op_pos,
            detail: format!("@{callee} cloned as @{new_name}"),
        });
        target = new_name;
    }
    if let Some(e) = element {
        if let Some(call) = module.top.find_mut(id) {
            retype(&mut call.operand_types[k], e);
        }
        let f = find_func_mut(module, &target).expect("callee exists");
        retype(&mut f.regions[0].blocks[0].args[k].ty, e);
        set_func_input(f, k, e)?;
    }
    let f = find_func(module, &target).expect("callee exists");
    let param = f.regions[0].blocks[0].args[k].name.clone();
    flow.events.push(Event {
        kind: "call",
        arg,
        function: func.to_string(),
        loc: op_loc,
        pos: op_pos,
        detail: format!("operand {k} into @{target}"),
    });
    work.push_back((target, param, arg));
    Ok(())
}

fn follow_transpose(module: &mut Module, flow: &mut Flow, func: &str, id: u32, arg: usize) {
    let Some(op) = module.top.find(id) else {
        return;
    };
    let perm = op.prop("permutation").and_then(parse_array_i64);
    let result = op.result_names();
    let ok = match (&perm, result.as_slice()) {
        (Some(_), [r]) => {
            let uses = uses_in(module, func, r);
            !uses.is_empty()
                && uses
                    .iter()
                    .all(|(_, k, name)| name == "stablehlo.dot_general" && *k < 2)
        }
        _ => false,
    };
    if !ok {
        flow.other_uses.push(OtherUse {
            op: id,
            operand: 0,
            arg,
            function: func.to_string(),
            reason: "transpose not used only by dot_general".to_string(),
        });
        return;
    }
    flow.events.push(event(
        op,
        "transpose",
        arg,
        func,
        "transposed weight feeding dot_general".to_string(),
    ));
    let source = op.operands[0].clone();
    flow.transposed.insert(
        (func.to_string(), result[0].clone()),
        Transposed {
            arg,
            perm: perm.unwrap_or_default(),
            op: id,
            source,
        },
    );
}

/// The weight argument of operand `k` of a dot, and its transpose if any.
fn weight_of(flow: &Flow, func: &str, value: &str) -> Option<(usize, Option<Transposed>)> {
    let key = (func.to_string(), value.to_string());
    if let Some(&arg) = flow.values.get(&key) {
        return Some((arg, None));
    }
    flow.transposed.get(&key).map(|t| (t.arg, Some(t.clone())))
}

/// Numbers the `dot_general` sites with a weight operand, in pre-order over the module.
pub fn sites(module: &Module, flow: &Flow) -> Result<Vec<Site>, RewriteError> {
    let mut out = Vec::new();
    let mut err = None;
    for f in module.functions() {
        let Some(fname) = func_name(f) else { continue };
        f.walk_nested(&mut |op| {
            if op.name != "stablehlo.dot_general" || op.operands.len() != 2 || err.is_some() {
                return;
            }
            let rhs = weight_of(flow, &fname, &op.operands[1]);
            let lhs = weight_of(flow, &fname, &op.operands[0]);
            let (weight_operand, (arg, transposed), both) = match (lhs, rhs) {
                (l, Some(r)) => (1, r, l.map(|l| l.0)),
                (Some(l), None) => (0, l, None),
                (None, None) => return,
            };
            let Some(dims) = op.prop("dot_dimension_numbers").and_then(DotDims::parse) else {
                err = Some(RewriteError::new(
                    "parser",
                    op.pos,
                    "`dot_dimension_numbers = #stablehlo.dot<...>` on a dot_general",
                    &format!("{:?}", op.prop("dot_dimension_numbers")),
                ));
                return;
            };
            out.push(Site {
                site: out.len(),
                op: op.id,
                function: fname.clone(),
                arg,
                weight_operand,
                transposed,
                dims,
                both_weights: both,
            });
        });
    }
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
