//! A type-consistency check of a module (run on the input and after every pass, and in tests):
//! every operand type matches its value's definition, functions, calls, returns and while
//! loops agree.

use std::collections::{HashMap, HashSet};

use super::attr::FunctionType;
use super::flow::{find_func, func_name};
use super::ir::{Module, Op, Type};
use super::RewriteError;

fn err(op: &Op, expected: String, found: String) -> RewriteError {
    RewriteError::new("verify", op.pos, &expected, &found)
}

fn list(ts: &[Type]) -> String {
    ts.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the module's types; the first inconsistency is the error.
pub fn verify(module: &Module) -> Result<(), RewriteError> {
    verify_pending(module, &HashSet::new())
}

/// Whether an operand declared `declared` may be an FP8 value typed `defined` while its use
/// is pending: the same tensor but for the element type.
fn pending_fp8(defined: &Type, declared: &Type) -> bool {
    match (defined.as_tensor(), declared.as_tensor()) {
        (Some(d), Some(t)) => {
            d.element.is_fp8()
                && t.element.is_quantizable_float()
                && d.dims == t.dims
                && d.encoding == t.encoding
        }
        _ => false,
    }
}

/// [`verify`], except that the operands in `pending` (op id, operand index) may be FP8 values
/// still declared as the float tensor they were: uses of a retyped weight that a later pass
/// of the same run rewrites (see [`super::pipeline`]).
pub(crate) fn verify_pending(
    module: &Module,
    pending: &HashSet<(u32, usize)>,
) -> Result<(), RewriteError> {
    let mut signatures: HashMap<String, FunctionType> = HashMap::new();
    for f in module.functions() {
        if let (Some(name), Some(ft)) = (func_name(f), f.prop("function_type")) {
            signatures.insert(name, FunctionType::parse(ft, f.pos)?);
        }
    }
    fn define<'m>(op: &'m Op, types: &mut HashMap<&'m str, &'m Type>) {
        for r in &op.regions {
            for b in &r.blocks {
                for a in &b.args {
                    types.insert(&a.name, &a.ty);
                }
            }
        }
    }
    for f in module.functions() {
        let Some(name) = func_name(f) else { continue };
        let Some(sig) = signatures.get(&name) else {
            continue;
        };
        let mut types: HashMap<&str, &Type> = HashMap::new();
        if let Some(entry) = f.regions.first().and_then(|r| r.blocks.first()) {
            let args: Vec<Type> = entry.args.iter().map(|a| a.ty.clone()).collect();
            if args != sig.inputs {
                return Err(err(
                    f,
                    format!(
                        "@{name}'s block arguments to match its function_type ({})",
                        list(&sig.inputs)
                    ),
                    list(&args),
                ));
            }
        }
        let mut bad = None;
        define(f, &mut types);
        let mut ops: Vec<&Op> = Vec::new();
        f.walk_nested(&mut |op| ops.push(op));
        let mut result_names: Vec<Vec<String>> = Vec::new();
        for op in &ops {
            result_names.push(op.result_names());
        }
        for (op, rn) in ops.iter().zip(result_names.iter()) {
            define(op, &mut types);
            if rn.len() != op.result_types.len() {
                return Err(err(
                    op,
                    format!("{} result types for `{}`", rn.len(), op.name),
                    format!("{}", op.result_types.len()),
                ));
            }
            for (n, t) in rn.iter().zip(op.result_types.iter()) {
                types.insert(n.as_str(), t);
            }
        }
        for op in &ops {
            if op.operands.len() != op.operand_types.len() {
                bad = Some(err(
                    op,
                    format!("{} operand types for `{}`", op.operands.len(), op.name),
                    format!("{}", op.operand_types.len()),
                ));
                break;
            }
            for (k, (o, t)) in op.operands.iter().zip(op.operand_types.iter()).enumerate() {
                match types.get(o.as_str()) {
                    Some(def) if *def == t => {}
                    Some(def) if pending.contains(&(op.id, k)) && pending_fp8(def, t) => {}
                    Some(def) => {
                        bad = Some(err(
                            op,
                            format!("operand {o} of `{}` typed `{def}` as defined", op.name),
                            format!("`{t}`"),
                        ));
                    }
                    None => {
                        bad = Some(err(
                            op,
                            format!("operand {o} of `{}` defined in @{name}", op.name),
                            "no definition".into(),
                        ));
                    }
                }
            }
            if bad.is_some() {
                break;
            }
            match op.name.as_str() {
                "func.return" if op.operand_types != sig.results => {
                    bad = Some(err(
                        op,
                        format!("func.return types ({}) of @{name}", list(&sig.results)),
                        list(&op.operand_types),
                    ));
                }
                "func.call" => {
                    let callee = op
                        .prop("callee")
                        .map(|c| c.trim().trim_start_matches('@').to_string())
                        .unwrap_or_default();
                    if let Some(cs) = signatures.get(&callee) {
                        if cs.inputs != op.operand_types || cs.results != op.result_types {
                            bad = Some(err(
                                op,
                                format!("a call matching @{callee}'s type {}", cs.print()),
                                format!(
                                    "({}) -> ({})",
                                    list(&op.operand_types),
                                    list(&op.result_types)
                                ),
                            ));
                        }
                    } else if find_func(module, &callee).is_none() {
                        bad = Some(err(op, format!("a function @{callee}"), "none".into()));
                    }
                }
                "stablehlo.while" => {
                    let ok = op.operand_types == op.result_types
                        && op.regions.iter().all(|r| {
                            r.blocks.first().is_some_and(|b| {
                                b.args.iter().map(|a| &a.ty).eq(op.operand_types.iter())
                            })
                        })
                        && op
                            .regions
                            .get(1)
                            .and_then(|r| r.blocks.first())
                            .and_then(|b| b.ops.last())
                            .is_some_and(|ret| ret.operand_types == op.operand_types);
                    if !ok {
                        bad = Some(err(
                            op,
                            "while operand, result, block argument and body return types to agree"
                                .into(),
                            list(&op.operand_types),
                        ));
                    }
                }
                _ => {}
            }
            if bad.is_some() {
                break;
            }
        }
        if let Some(e) = bad {
            return Err(e);
        }
    }
    Ok(())
}
